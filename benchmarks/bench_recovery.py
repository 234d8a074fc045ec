"""How long a SIGKILLed worker's step waits before it runs again (CONTRACT §6.1), measured with real worker
processes and a redis-server this script starts itself.

    python benchmarks/bench_recovery.py                    # lease 3 s and 15 s (the default), 3 runs each
    python benchmarks/bench_recovery.py --leases 5 --runs 5

Each run: one worker starts a 3-step chain whose middle node sleeps 2 s; the worker is SIGKILLed as soon as
that node starts; a second worker is already running (so the figure is the lease, not a process start).
Measured: kill -> the node starts again on the second worker (recovery), and kill -> the run completes.
``job_timeout_seconds`` is 300 throughout: before heartbeat leases, recovery took that + 10 s.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e import Project, wait_for  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

CHAIN = """
nodes:
  - {id: start, uses: noop, params: {log: "LOG"}}
  - {id: slow, uses: slow, params: {seconds: 2, log: "LOG"}}
  - {id: end, uses: noop, params: {log: "LOG"}}
edges:
  - {source: start, target: slow}
  - {source: slow, target: end}
"""


def _starts(project: Project) -> list[float]:
    return [float(line.split()[1]) for line in project.calls() if line.startswith("slow-at ")]


def one_run(url: str, lease: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        project = Project(Path(tmp), url, lease=lease, job_timeout=300)
        text = CHAIN.replace("LOG", str(project.log))
        (Path(tmp) / "blueprints" / "chain.yaml").write_text(text)
        # a node module that also logs the wall-clock time of each start
        nodes = (Path(tmp) / "e2e_nodes.py").read_text().replace(
            '    _log(ctx, "start")\n',
            '    _log(ctx, "start")\n    open(ctx.params["log"], "a").write(f"slow-at {time.time()}\\n")\n')
        (Path(tmp) / "e2e_nodes.py").write_text(nodes)
        try:
            project.start_worker()
            project.start_worker()
            # whichever worker runs the slow node is the victim; the other one recovers it
            run_id = project.cli("enqueue", "chain", check=True).stdout.strip()
            wait_for(lambda: _starts(project), 30, "the slow node to start")
            pid = next(line.split()[-1] for line in project.calls() if line.startswith("slow start"))
            victim = next(w for w in project.workers if str(w.pid) == pid)
            victim.send_signal(signal.SIGKILL)
            killed = time.time()
            victim.wait()
            restart = wait_for(lambda: len(s := _starts(project)) > 1 and s[1], 120, "the step to be recovered")
            wait_for(lambda: project.cli_json("inspect", run_id)["status"] == "completed", 120, "the run to end",
                     interval=0.1)
            done = time.time()
            return restart - killed, done - killed
        finally:
            project.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leases", type=float, nargs="+", default=[3.0, 15.0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    server = RedisServer()
    try:
        print(f"{'lease':>7} {'recovery p50':>13} {'min':>6} {'max':>6} {'run done p50':>13}")
        for lease in args.leases:
            results = [one_run(server.url, lease) for _ in range(args.runs)]
            rec = [r[0] for r in results]
            done = [r[1] for r in results]
            print(f"{lease:>6g}s {statistics.median(rec):>12.2f}s {min(rec):>5.2f}s {max(rec):>5.2f}s "
                  f"{statistics.median(done):>12.2f}s", flush=True)
    finally:
        server.close()


if __name__ == "__main__":
    main()
