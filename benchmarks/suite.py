"""Issue 9 ("Faster than Flowcraft") in one command: every figure measured with real worker processes.

    python3 benchmarks/suite.py                      # full sizes, median of 3 (several minutes)
    python3 benchmarks/suite.py --quick              # smaller sizes, 1 repeat (under ~2 minutes)
    python3 benchmarks/suite.py --only chain,idle --json /tmp/figures.json

The suite starts its own redis-server (unix socket in a temp dir; never 127.0.0.1:6379), writes a throwaway
project (``flowcraft.yaml``, ``blueprints/*.json``, ``bench_nodes.py``) and starts real worker processes in it
(``python3 -m flowcraft_cli worker start``, this checkout first on PYTHONPATH), one group per section, each
group on a queue of its own. Runs are started through the Python API (``ArqAdapter.start_run``, at most 32 in
flight, as a client would) and awaited by reading ``workflow:status:<run_id>`` with GET/MGET until a deadline.
Every timed figure is a median over ``--repeats``; a plain table goes to stdout, progress to stderr, and all
figures (with every sample) to the JSON file. ``benchmarks/README.md`` explains each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from tests.redis_server import RedisServer  # noqa: E402

FINAL = ("completed", "failed", "cancelled")
SECTIONS = ("chain", "fan", "many", "io", "latency", "idle", "runs", "batch", "longchain")
IN_FLIGHT = 32  # start_run calls at once, as perf/compare.sh's driver does
HEAD = 500  # status keys read per MGET: runs finish roughly in start order, so the oldest pending ones

# The node module of the throwaway project. `stamp` appends "<run_id> <node_id> <start> <end>" (time.time())
# with one O_APPEND write to $BENCH_STAMPS: no Redis command, a few microseconds.
NODES_PY = '''\
"""Nodes of the benchmark project written by benchmarks/suite.py."""
import asyncio
import os
import time

from flowcraft_cli import node

_stamps = None


@node("noop")
async def noop(ctx):
    return None


@node("nap")
async def nap(ctx):
    await asyncio.sleep(ctx.params["ms"] / 1000)


@node("stamp")
async def stamp(ctx):
    global _stamps
    start = time.time()
    if _stamps is None:
        _stamps = os.open(os.environ["BENCH_STAMPS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_stamps, f"{ctx.run_id} {ctx.node_id} {start!r} {time.time()!r}\\n".encode())
'''


@dataclass(frozen=True)
class Sizes:
    chain: int = 200  # (a) nodes in the chain
    fan: int = 200  # (b) parallel nodes between start and join
    many: int = 500  # (c) concurrent runs of a 3-node chain
    io_fan: int = 200  # parallel 50 ms nodes
    io_ms: int = 50
    io_concurrency: int = 10
    runs: int = 10_000  # scale: concurrent 1-node runs (and a tenth of it)
    batch: int = 10_000  # scale: items of one batch node (and a tenth)
    longchain: int = 2_000  # scale: nodes in a chain (and a tenth)


# (a)-(c) and the I/O case keep their sizes (comparable with perf/compare.sh); the scale shapes shrink
QUICK = Sizes(runs=2_000, batch=2_000, longchain=1_000)


# ---------------------------------------------------------------- the throwaway project

def chain_blueprint(bp_id: str, n: int, uses: str = "noop") -> dict[str, Any]:
    """``n0000 -> n0001 -> ...``: each node waits for the one before."""
    ids = [f"n{i:04d}" for i in range(n)]
    return {"id": bp_id, "nodes": [{"id": i, "uses": uses} for i in ids],
            "edges": [{"source": a, "target": b} for a, b in pairwise(ids)]}


def fan_blueprint(bp_id: str, width: int, uses: str = "noop", params: dict[str, Any] | None = None) -> dict[str, Any]:
    """``start -> p0..p{width-1} -> join`` (``joinStrategy: all``); start and join are no-ops."""
    middle = [{"id": f"p{i}", "uses": uses, **({"params": params} if params else {})} for i in range(width)]
    edges = [e for i in range(width) for e in ({"source": "start", "target": f"p{i}"},
                                                {"source": f"p{i}", "target": "join"})]
    return {"id": bp_id, "edges": edges, "nodes": [
        {"id": "start", "uses": "noop"}, *middle, {"id": "join", "uses": "noop", "config": {"joinStrategy": "all"}}]}


def batch_blueprint(bp_id: str) -> dict[str, Any]:
    """One ``batch`` node that runs ``noop`` once per item of the run input's ``items``."""
    return {"id": bp_id, "nodes": [{"id": "items", "uses": "batch", "params": {"worker": "noop"}, "inputs": "items"}],
            "edges": []}


def project_blueprints(sizes: Sizes) -> list[dict[str, Any]]:
    """Every blueprint the suite runs; ids carry their size so one project serves every case."""
    chains = {sizes.chain, sizes.longchain, sizes.longchain // 10, 3, 1}
    return [
        *(chain_blueprint(f"chain-{n}", n) for n in sorted(chains)),
        chain_blueprint(f"stamps-{sizes.chain}", sizes.chain, uses="stamp"),
        fan_blueprint(f"fan-{sizes.fan}", sizes.fan),
        fan_blueprint(f"io-{sizes.io_fan}", sizes.io_fan, uses="nap", params={"ms": sizes.io_ms}),
        batch_blueprint("batch"),
    ]


def write_project(root: Path, redis_url: str, sizes: Sizes) -> None:
    """flowcraft.yaml, bench_nodes.py and one JSON file per blueprint. Queues are set per worker group."""
    (root / "blueprints").mkdir(parents=True)
    (root / "bench_nodes.py").write_text(NODES_PY)
    for bp in project_blueprints(sizes):
        (root / "blueprints" / f"{bp['id']}.json").write_text(json.dumps(bp))
    (root / "flowcraft.yaml").write_text(
        "# written by benchmarks/suite.py\n"
        f'redis: {{url: "{redis_url}"}}\n'
        "blueprints: [./blueprints]\n"
        "registry: [bench_nodes]\n"
        "state: {ttl_seconds: 3600}\n"
        "worker: {concurrency: 5, shutdown_wait_seconds: 2}\n")


# ---------------------------------------------------------------- processes and /proc

_STARTED: list[subprocess.Popen[bytes]] = []  # every process this script started, stopped by PID at exit


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    """SIGTERM (a worker hands its steps back and exits), then SIGKILL if it has not exited in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_all_processes() -> None:
    while _STARTED:
        stop_process(_STARTED.pop())


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (/proc/<pid>/stat fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def proc_memory_mb(pid: int, field_name: str) -> float:
    """A /proc/<pid>/status memory line in MB: ``VmHWM`` is the peak resident set, ``VmRSS`` the current one."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no {field_name}")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks (q in 0..1)."""
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A case could not be measured: a run did not complete, a worker exited, a deadline passed."""


# ---------------------------------------------------------------- the session

class Session:
    """The redis-server, the project folder, an admin connection (INFO, status polling) and the count of
    commands this script sends itself, so they can be left out of the figures."""

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self.server = RedisServer()
        self.root = Path(tempfile.mkdtemp(prefix="flowcraft-bench-"))
        self.stamps = self.root / "stamps.log"
        write_project(self.root, self.server.url, sizes)
        self.admin = Redis.from_url(self.server.url, decode_responses=True)
        self.own_commands = 0  # GET/MGET of status keys; INFO is left out by name

    async def commands_total(self) -> int:
        """Commands Redis has executed so far, Lua's inside included, INFO's own calls and ours excluded."""
        stats = await self.admin.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info") - self.own_commands

    async def read_statuses(self, run_ids: list[str]) -> list[str | None]:
        keys = [f"workflow:status:{r}" for r in run_ids]
        self.own_commands += 1
        values = [await self.admin.get(keys[0])] if len(keys) == 1 else await self.admin.mget(keys)
        return [json.loads(v)["status"] if v else None for v in values]

    def worker_env(self, queue: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCRAFT_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.update(FLOWCRAFT_QUEUE=queue, BENCH_STAMPS=str(self.stamps), PYTHONUNBUFFERED="1")
        return env

    async def close(self, *, keep_project: bool) -> None:
        """Stops the redis-server; the project folder (worker logs) is kept only when asked."""
        await self.admin.aclose()
        self.server.close()
        if keep_project:
            log(f"worker logs kept in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


class WorkerGroup:
    """``count`` worker processes on a queue of their own, and a client ArqAdapter for that queue.

    Entering it starts the workers, waits for each banner, then for one warm-up run of ``chain-3``."""

    def __init__(self, session: Session, name: str, count: int, concurrency: int = 5) -> None:
        self.session = session
        self.name = name
        self.count = count
        self.concurrency = concurrency
        self.queue = f"bench-{name}-{os.getpid()}"
        self.workers: list[subprocess.Popen[bytes]] = []
        self.finished_runs = 0
        self.client: Any = None

    @property
    def label(self) -> str:
        return f"{self.count} x c{self.concurrency}"

    async def __aenter__(self) -> WorkerGroup:
        try:
            for i in range(self.count):
                self.workers.append(self._start_worker(i))
            for i, proc in enumerate(self.workers):
                await self._wait_banner(i, proc)
            await self._open_client()
            await run_and_wait(self, "chain-3", 1)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.close()
            await self.client.redis.aclose()
        for proc in self.workers:
            stop_process(proc)
            _STARTED.remove(proc)

    def _log_path(self, i: int) -> Path:
        return self.session.root / f"worker-{self.name}-{i}.log"

    def _start_worker(self, i: int) -> subprocess.Popen[bytes]:
        with open(self._log_path(i), "wb") as out:
            # a session of its own: a Ctrl-C at the terminal reaches this script, which stops the worker by PID
            proc = subprocess.Popen(
                [sys.executable, "-m", "flowcraft_cli", "worker", "start", "--concurrency", str(self.concurrency)],
                cwd=self.session.root, env=self.session.worker_env(self.queue), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _STARTED.append(proc)
        return proc

    async def _wait_banner(self, i: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while b"flowcraft worker" not in self._log_path(i).read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"worker {self.name}-{i} did not start: {self.tail(i)}")
            await asyncio.sleep(0.05)

    async def _open_client(self) -> None:
        from flowcraft_cli.project import load_project, open_adapter

        project = load_project(str(self.session.root / "flowcraft.yaml"), overrides={"queue.name": self.queue})
        self.client = await open_adapter(project)

    def tail(self, i: int, lines: int = 5) -> str:
        return " | ".join(self._log_path(i).read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        for i, proc in enumerate(self.workers):
            if proc.poll() is not None:
                raise BenchError(f"worker {self.name}-{i} exited with {proc.returncode}: {self.tail(i)}")

    def peak_rss_mb(self) -> float:
        """The largest VmHWM (peak resident set since start) among the group's workers."""
        return max(proc_memory_mb(p.pid, "VmHWM") for p in self.workers)

    def rss_mb(self) -> float:
        return max(proc_memory_mb(p.pid, "VmRSS") for p in self.workers)


# ---------------------------------------------------------------- starting and awaiting runs

async def start_runs(group: WorkerGroup, bp_id: str, count: int, run_input: dict[str, Any] | None) -> list[str]:
    """``count`` runs through the client's ``start_run``, at most IN_FLIGHT at once, in start order."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> str:
        async with gate:
            return str(await group.client.start_run(bp_id, run_input or {}))

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def wait_final(group: WorkerGroup, run_ids: list[str], deadline: float) -> dict[str, str]:
    """Poll the status keys until every run is final (GET every 2 ms for one run, MGET of the oldest HEAD
    pending ones every 10 ms for many), then return run id -> status. BenchError past the deadline."""
    pending = list(run_ids)
    done: dict[str, str] = {}
    interval = 0.002 if len(run_ids) == 1 else 0.01
    while pending:
        if time.monotonic() > deadline:
            group.check_alive()
            raise BenchError(f"{len(pending)} of {len(run_ids)} runs not finished by the deadline")
        head = pending[:HEAD]
        finished = [(r, s) for r, s in zip(head, await group.session.read_statuses(head), strict=True) if s in FINAL]
        done.update(finished)
        if finished:
            gone = {r for r, _ in finished}
            pending = [r for r in pending if r not in gone]
        else:
            group.check_alive()
            await asyncio.sleep(interval)
    return done


async def run_and_wait(group: WorkerGroup, bp_id: str, runs: int, run_input: dict[str, Any] | None = None,
                       timeout_s: float = 120) -> list[str]:
    """Start ``runs`` runs of ``bp_id`` and wait until all completed (BenchError otherwise)."""
    deadline = time.monotonic() + timeout_s
    run_ids = await start_runs(group, bp_id, runs, run_input)
    statuses = await wait_final(group, run_ids, deadline)
    group.finished_runs += len(run_ids)
    bad = [(r, s) for r, s in statuses.items() if s != "completed"]
    if bad:
        raise BenchError(f"{len(bad)} of {runs} runs of {bp_id} did not complete, e.g. {bad[0]}")
    return run_ids


# ---------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """``runs`` runs of ``blueprint``, all started at once; ``executions`` node executions in all."""

    key: str
    label: str
    blueprint: str
    executions: int
    runs: int = 1
    run_input: dict[str, Any] | None = None


@dataclass
class Figures:
    """One case on one worker group: medians over the repeats, and every sample."""

    case: str
    label: str
    workers: str
    runs: int
    executions: int
    time_s: float
    execs_per_s: float
    runs_per_s: float
    redis_cmds_per_exec: float
    peak_rss_mb: float
    samples_s: list[float] = field(default_factory=list)
    samples_cmds_per_exec: list[float] = field(default_factory=list)


async def timed_rep(group: WorkerGroup, case: Case) -> tuple[float, float]:
    """One repeat: seconds from the first start_run to the last final status, Redis commands per node
    execution over the same span (INFO commandstats before and after: run starts, worker commands and
    commands inside Lua scripts included; INFO and our status reads excluded)."""
    timeout_s = 60 + case.executions * 0.05
    before = await group.session.commands_total()
    t0 = time.perf_counter()
    await run_and_wait(group, case.blueprint, case.runs, case.run_input, timeout_s)
    elapsed = time.perf_counter() - t0
    commands = await group.session.commands_total() - before
    return elapsed, commands / case.executions


async def measure(group: WorkerGroup, case: Case, repeats: int, *, warm_up: bool = True,
                  after_rep: Callable[[], None] | None = None) -> Figures:
    """A case's figures: one untimed warm-up repeat (unless ``warm_up`` is False), then ``repeats`` timed
    ones; each figure is the median. Peak RSS is read after the last repeat."""
    log(f"  {case.label} on {group.label} ...")
    if warm_up:
        await run_and_wait(group, case.blueprint, case.runs, case.run_input, 60 + case.executions * 0.05)
    times, cmds = [], []
    for _ in range(repeats):
        elapsed, per_exec = await timed_rep(group, case)
        times.append(elapsed)
        cmds.append(per_exec)
        if after_rep is not None:
            after_rep()
    t = statistics.median(times)
    log(f"    {t:.3f} s  {case.executions / t:,.0f} execs/s  {statistics.median(cmds):.1f} cmds/exec")
    return Figures(case.key, case.label, group.label, case.runs, case.executions, t, case.executions / t,
                   case.runs / t, statistics.median(cmds), group.peak_rss_mb(), times, cmds)


def throughput_cases(sizes: Sizes, only: set[str]) -> list[Case]:
    cases = [
        Case("chain", f"(a) chain of {sizes.chain}", f"chain-{sizes.chain}", sizes.chain),
        Case("fan", f"(b) 1 -> {sizes.fan} -> 1", f"fan-{sizes.fan}", sizes.fan + 2),
        Case("many", f"(c) {sizes.many} runs x 3", "chain-3", 3 * sizes.many, runs=sizes.many),
    ]
    return [c for c in cases if c.key in only]


def scale_pairs(sizes: Sizes, only: set[str]) -> list[tuple[Case, Case]]:
    """(the 1/10 case, the full case) for each scale shape."""

    def batch(n: int) -> Case:
        return Case("batch", f"batch of {n:,} items", "batch", n + 1, run_input={"items": list(range(n))})

    def runs(n: int) -> Case:
        return Case("runs", f"{n:,} runs x 1 node", "chain-1", n, runs=n)

    def longchain(n: int) -> Case:
        return Case("longchain", f"chain of {n:,}", f"chain-{n}", n)

    pairs = {"runs": (runs(sizes.runs // 10), runs(sizes.runs)),
             "batch": (batch(sizes.batch // 10), batch(sizes.batch)),
             "longchain": (longchain(sizes.longchain // 10), longchain(sizes.longchain))}
    return [pair for key, pair in pairs.items() if key in only]


# ---------------------------------------------------------------- sections

async def section_throughput(session: Session, only: set[str], repeats: int,
                             worker_counts: Iterable[int]) -> list[Figures]:
    """(a), (b), (c) on 1 and on 2 worker processes (concurrency 5 each)."""
    rows = []
    cases = throughput_cases(session.sizes, only)
    for count in worker_counts if cases else ():
        async with WorkerGroup(session, f"w{count}", count) as group:
            for case in cases:
                rows.append(await measure(group, case, repeats))
    return rows


async def section_io(session: Session, repeats: int) -> dict[str, Any]:
    """1 -> N -> 1 where each of the N sleeps ``io_ms`` (asyncio.sleep), one worker at concurrency
    ``io_concurrency``; the figure is the run's created_at -> finished_at from ``flowcraft inspect --json``
    (ideal: N * io_ms / concurrency)."""
    s = session.sizes
    case = Case("io", f"1 -> {s.io_fan} -> 1 of {s.io_ms} ms sleeps", f"io-{s.io_fan}", s.io_fan + 2)
    async with WorkerGroup(session, "io", 1, s.io_concurrency) as group:
        await run_and_wait(group, case.blueprint, 1)  # warm-up
        spans = []
        for _ in range(repeats):
            (run_id,) = await run_and_wait(group, case.blueprint, 1)
            spans.append(inspect_span_s(session, group, run_id))
    ideal = s.io_fan * s.io_ms / 1000 / s.io_concurrency
    return {"label": case.label, "workers": group.label, "created_to_finished_s": statistics.median(spans),
            "ideal_s": ideal, "samples_s": spans}


def inspect_span_s(session: Session, group: WorkerGroup, run_id: str) -> float:
    """created_at -> finished_at of a run, read with the real CLI (``inspect RUN --json``)."""
    proc = subprocess.run([sys.executable, "-m", "flowcraft_cli", "inspect", run_id, "--json"],
                          cwd=session.root, env=session.worker_env(group.queue), capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"flowcraft inspect {run_id} --json exited {proc.returncode}: {proc.stderr.strip()}")
    view = json.loads(proc.stdout)
    created, finished = (datetime.fromisoformat(view[k].replace("Z", "+00:00")) for k in ("created_at", "finished_at"))
    return (finished - created).total_seconds()


async def section_latency(session: Session, repeats: int) -> dict[str, Any]:
    """Chain hop latency on one worker: each ``stamp`` node writes time.time() at its start and end; a hop is
    start(n[i+1]) - end(n[i]), pooled over ``repeats`` runs of the chain."""
    n = session.sizes.chain
    hops_ms: list[float] = []
    async with WorkerGroup(session, "latency", 1) as group:
        await run_and_wait(group, f"stamps-{n}", 1)  # warm-up
        for _ in range(repeats):
            (run_id,) = await run_and_wait(group, f"stamps-{n}", 1)
            hops_ms += chain_hops_ms(session.stamps, run_id)
    if len(hops_ms) != repeats * (n - 1):
        raise BenchError(f"expected {repeats * (n - 1)} hops from {session.stamps}, found {len(hops_ms)}")
    return {"chain": n, "hops": len(hops_ms), "p50_ms": percentile(hops_ms, 0.5), "p99_ms": percentile(hops_ms, 0.99),
            "max_ms": max(hops_ms)}


def chain_hops_ms(stamps: Path, run_id: str) -> list[float]:
    """start of each node minus end of the node before it, in ms, from the stamp lines of one chain run."""
    times: dict[str, tuple[float, float]] = {}
    for line in stamps.read_text().splitlines():
        rid, node_id, start, end = line.split()
        if rid == run_id:
            times[node_id] = (float(start), float(end))
    ordered = [times[k] for k in sorted(times)]  # n0000, n0001, ...
    return [(b[0] - a[1]) * 1000 for a, b in pairwise(ordered)]


async def section_idle(session: Session, seconds: float = 5) -> dict[str, Any]:
    """One worker with nothing to do, 1 s after its warm-up run: Redis commands/s (every client; this
    script sends only INFO, left out) and the worker's CPU% (utime+stime from /proc/<pid>/stat) over ``seconds``."""
    async with WorkerGroup(session, "idle", 1) as group:
        await asyncio.sleep(1)
        pid = group.workers[0].pid
        before, ticks, t0 = await session.commands_total(), proc_cpu_ticks(pid), time.monotonic()
        await asyncio.sleep(seconds)
        commands, cpu, elapsed = (await session.commands_total() - before, proc_cpu_ticks(pid) - ticks,
                                  time.monotonic() - t0)
        group.check_alive()
    return {"seconds": elapsed, "redis_cmds_per_s": commands / elapsed,
            "cpu_pct": 100 * cpu / os.sysconf("SC_CLK_TCK") / elapsed}


async def section_scale(session: Session, only: set[str], repeats: int) -> dict[str, Any]:
    """Each scale shape at a tenth of its size and at full size, on one worker (concurrency 5), and the
    ratio of their times (about 10 if the cost is linear). The runs shape goes first on a fresh worker,
    and the worker's VmRSS is sampled after each of its repeats with the count of runs it has finished."""
    pairs = scale_pairs(session.sizes, only)
    out: dict[str, Any] = {}
    if not pairs:
        return out
    async with WorkerGroup(session, "scale", 1) as group:
        samples: list[dict[str, float]] = []

        def sample_rss() -> None:
            samples.append({"finished_runs": group.finished_runs, "rss_mb": group.rss_mb()})

        for small, large in pairs:
            track = sample_rss if small.key == "runs" else None
            a = await measure(group, small, repeats, warm_up=False, after_rep=track)
            b = await measure(group, large, repeats, warm_up=False, after_rep=track)
            out[small.key] = {"small": a, "large": b, "size_ratio": large.executions / small.executions,
                              "time_ratio": b.time_s / a.time_s}
        if samples:
            out["rss_growth"] = {"first": samples[0], "last": samples[-1], "samples": samples,
                                 "mb_per_1000_runs": 1000 * (samples[-1]["rss_mb"] - samples[0]["rss_mb"])
                                 / max(1, samples[-1]["finished_runs"] - samples[0]["finished_runs"])}
    return out


# ---------------------------------------------------------------- output

def print_report(result: dict[str, Any]) -> None:
    """The plain-text table (no rich): one line per measured case, then the single figures."""
    meta = result["meta"]
    print(f"flowcraft suite: {meta['mode']}, median of {meta['repeats']}, {meta['cpus']} CPUs, "
          f"load {meta['load_start']} -> {meta['load_end']}, {meta['duration_s']:.0f} s")
    rows = result["throughput"] + [f for pair in result["scale"].values() if "small" in pair
                                   for f in (pair["small"], pair["large"])]
    if rows:
        print(f"{'case':<28}{'workers':>9}{'runs':>8}{'execs':>8}{'median':>10}{'execs/s':>10}{'runs/s':>9}"
              f"{'cmds/exec':>11}{'peak RSS':>10}")
        for f in rows:
            print(f"{f['label']:<28}{f['workers']:>9}{f['runs']:>8,}{f['executions']:>8,}{f['time_s']:>9.3f}s"
                  f"{f['execs_per_s']:>10,.0f}{f['runs_per_s']:>9,.2f}{f['redis_cmds_per_exec']:>11.1f}"
                  f"{f['peak_rss_mb']:>8.0f}MB")
    for key, pair in result["scale"].items():
        if "small" in pair:
            print(f"scale {key}: {pair['small']['time_s']:.3f} s -> {pair['large']['time_s']:.3f} s for "
                  f"{pair['size_ratio']:.0f}x the work: time ratio {pair['time_ratio']:.1f}x (linear: "
                  f"{pair['size_ratio']:.0f}x)")
    if growth := result["scale"].get("rss_growth"):
        print(f"worker RSS: {growth['first']['rss_mb']:.0f} MB after {growth['first']['finished_runs']:,} finished "
              f"runs, {growth['last']['rss_mb']:.0f} MB after {growth['last']['finished_runs']:,} "
              f"({growth['mb_per_1000_runs']:+.2f} MB per 1,000 runs)")
    if io := result.get("io"):
        print(f"I/O-bound {io['label']}, {io['workers']}: created -> finished {io['created_to_finished_s']:.3f} s "
              f"(ideal {io['ideal_s']:.1f} s)")
    if lat := result.get("latency"):
        print(f"chain hop latency (finished -> successor started), {lat['hops']} hops: p50 {lat['p50_ms']:.2f} ms, "
              f"p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms")
    if idle := result.get("idle"):
        print(f"idle worker over {idle['seconds']:.1f} s: {idle['redis_cmds_per_s']:.1f} Redis cmds/s, "
              f"CPU {idle['cpu_pct']:.2f}%")


def load_avg() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip() or None


async def run_suite(args: argparse.Namespace, sizes: Sizes, only: set[str]) -> dict[str, Any]:
    session = Session(sizes)
    started, load_start = time.monotonic(), load_avg()
    log(f"redis {session.server.url}, project {session.root}")
    ok = False
    try:
        throughput = await section_throughput(session, only, args.repeats, args.workers)
        result: dict[str, Any] = {"throughput": [asdict(f) for f in throughput], "scale": {}}
        if "io" in only:
            log("  I/O-bound fan ...")
            result["io"] = await section_io(session, args.repeats)
        if "latency" in only:
            log("  chain hop latency ...")
            result["latency"] = await section_latency(session, args.repeats)
        if "idle" in only:
            log("  idle worker ...")
            result["idle"] = await section_idle(session)
        scale = await section_scale(session, only, args.repeats)
        result["scale"] = {k: {**v, "small": asdict(v["small"]), "large": asdict(v["large"])}
                           if "small" in v else v for k, v in scale.items()}
        ok = True
    finally:
        await session.close(keep_project=not ok)
    result["meta"] = {"mode": "quick" if args.quick else "full", "repeats": args.repeats, "sizes": asdict(sizes),
                      "sections": sorted(only), "worker_counts": args.workers, "cpus": os.cpu_count(),
                      "load_start": load_start, "load_end": load_avg(), "python": platform.python_version(),
                      "commit": git_commit(), "duration_s": time.monotonic() - started}
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and 1 repeat (under ~2 minutes)")
    p.add_argument("--repeats", type=int, help="timed repeats per figure (default 3, 1 with --quick)")
    p.add_argument("--only", help=f"comma-separated sections to run (default all): {','.join(SECTIONS)}")
    p.add_argument("--workers", default="1,2", help="worker process counts for (a)-(c) (default 1,2)")
    p.add_argument("--json", default="/tmp/flowcraft-bench/suite.json", help="where to write the figures")
    args = p.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.workers = [int(w) for w in args.workers.split(",")]
    return args


def main() -> int:
    args = parse_args()
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if unknown := only - set(SECTIONS):
        sys.exit(f"--only: unknown section(s) {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    sizes = QUICK if args.quick else Sizes()

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = asyncio.run(run_suite(args, sizes, only))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process this suite started has been stopped", file=sys.stderr)
        return 130
    finally:
        stop_all_processes()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
