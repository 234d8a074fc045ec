"""CLI start-up: wall time of ``flowcraft --help`` and of ``flowcraft inspect RUN --json``, each a fresh
process, next to ``python -c pass`` (the interpreter's own start-up) measured in the same command.

    python benchmarks/bench_cli_startup.py              # median of 9 runs each
    python benchmarks/bench_cli_startup.py --repeats 21

It starts its own redis-server, makes one finished run through an in-process worker, then runs the CLI from
an empty temp directory with only FLOWCRAFT_REDIS_URL and FLOWCRAFT_QUEUE set (what a view needs, CONTRACT
§10). ``python -X importtime -m flowcraft_cli --help`` shows where the rest goes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from flowcraft_cli.distributed.adapter import ArqAdapter  # noqa: E402
from flowcraft_cli.loading import parse_blueprint  # noqa: E402
from flowcraft_cli.registry import NodeRegistry  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

QUEUE = "bench-startup"


async def make_run(url: str) -> str:
    registry = NodeRegistry({"noop": lambda ctx: ctx.node_id})
    bp = parse_blueprint({"id": "three", "nodes": [{"id": n, "uses": "noop"} for n in "abc"],
                          "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}]},
                         registry=registry)
    redis = Redis.from_url(url)
    adapter = ArqAdapter(connection=redis, queue_name=QUEUE, runtime_options={"registry": registry,
                                                                              "blueprints": [bp]})
    run_id = await adapter.start_run("three", {})
    await adapter.start(burst=True)
    await adapter.close()
    await redis.aclose()
    return run_id


def medians_s(cmds: list[list[str]], cwd: str, env: dict[str, str], repeats: int) -> list[float]:
    """Rounds of every command once, so that a change in machine load weighs on all of them alike."""
    times: list[list[float]] = [[] for _ in cmds]
    for _ in range(repeats):
        for i, cmd in enumerate(cmds):
            t = time.perf_counter()
            subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main(args: argparse.Namespace) -> None:
    server = RedisServer()
    try:
        run_id = asyncio.run(make_run(server.url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCRAFT_")}
        env.update({"FLOWCRAFT_REDIS_URL": server.url, "FLOWCRAFT_QUEUE": QUEUE,
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)})
        cli = [sys.executable, "-m", "flowcraft_cli"]
        with tempfile.TemporaryDirectory() as empty:
            rows = [("baseline: python -c pass", [sys.executable, "-c", "pass"]),
                    ("flowcraft --help", [*cli, "--help"]),
                    ("flowcraft inspect RUN --json", [*cli, "inspect", run_id, "--json"]),
                    ("flowcraft runs --json", [*cli, "runs", "--json"])]
            print(f"{'command':<32} {'median s':>9}")
            for (label, _), median in zip(rows, medians_s([cmd for _, cmd in rows], empty, env, args.repeats),
                                          strict=True):
                print(f"{label:<32} {median:>9.3f}")
    finally:
        server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    main(p.parse_args())
