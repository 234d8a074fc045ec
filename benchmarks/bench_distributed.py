"""Node steps per second through arq + Redis, against bare arq on the same worker settings.

    python benchmarks/bench_distributed.py            # chain of 300, fan-out/in of 300, 3 runs each
    python benchmarks/bench_distributed.py --n 1000

One process, one redis-server it starts itself (unix socket), one arq worker in burst mode with the same
settings flowcraft uses (max_jobs 10, poll_delay 0.02 s, JSON jobs). Also reported per step: flowcraft's own
Redis round trips (writes to the sockets of the adapter's own connection pool; arq's pickup and bookkeeping
excluded) and every Redis command executed, arq's and those inside Lua scripts included (INFO commandstats).
The "(live)" row runs the chain on a long-running worker (woken, not burst) and reports its idle commands/s. Baseline: N bare arq no-op jobs queued
at once, then drained. A queued flowcraft step is one arq job plus the engine's claim and commit (one Lua call
each; on a job's first delivery, the commit alone); a chain's later steps run inline (no arq job; one call each), so the ratio shows what a step costs over
the queue itself.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arq.worker import Worker, func  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from flowcraft_cli.distributed.adapter import ArqAdapter  # noqa: E402
from flowcraft_cli.distributed.queue import arq_pool_for  # noqa: E402
from flowcraft_cli.loading import parse_blueprint  # noqa: E402
from flowcraft_cli.registry import NodeRegistry  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


async def noop_node(ctx):
    return None


async def noop_job(ctx, *args):
    return None


def chain(n: int) -> dict:
    return {"id": f"chain-{n}", "nodes": [{"id": f"n{i}", "uses": "noop"} for i in range(n)],
            "edges": [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(n - 1)]}


def fan(n: int) -> dict:
    nodes = [{"id": "start", "uses": "noop"}, *({"id": f"w{i}", "uses": "noop"} for i in range(n)),
             {"id": "join", "uses": "noop"}]
    edges = [e for i in range(n) for e in ({"source": "start", "target": f"w{i}"}, {"source": f"w{i}", "target": "join"})]
    return {"id": f"fan-{n}", "nodes": nodes, "edges": edges}


async def bare_arq(redis: Redis, n: int, poll: float) -> float:
    pool = arq_pool_for(redis, "bench-bare")
    for i in range(n):
        await pool.enqueue_job("noop_job", i, _job_id=f"bare-{time.time_ns()}-{i}", _queue_name="bench-bare")
    worker = Worker(functions=[func(noop_job, name="noop_job", keep_result=0)], queue_name="bench-bare",
                    redis_pool=pool, burst=True, max_jobs=10, poll_delay=poll, handle_signals=False,
                    keep_result=0, job_serializer=pool.job_serializer, job_deserializer=pool.job_deserializer,
                    log_results=False, queue_read_limit=1000)
    t = time.perf_counter()
    await worker.main()
    elapsed = time.perf_counter() - t
    await worker.close()
    return elapsed


class RoundTrips:
    """Counts what flowcraft itself sends to Redis: one count per write to the socket of a connection of the
    adapter's own pool (a pipeline or a MULTI is one), not arq's (its job pickup and bookkeeping)."""

    def __init__(self, redis: Redis) -> None:
        from redis.asyncio.connection import AbstractConnection

        self.count = 0
        pool = redis.connection_pool
        original_get = pool.get_connection
        original_send = AbstractConnection.send_packed_command
        counter = self

        async def get_connection(*a, **kw):
            conn = await original_get(*a, **kw)
            conn._flowcraft_bench = True
            return conn

        async def send_packed_command(self, command, check_health=True):
            if getattr(self, "_flowcraft_bench", False):
                counter.count += 1
            return await original_send(self, command, check_health)

        pool.get_connection = get_connection
        AbstractConnection.send_packed_command = send_packed_command


async def commands_done(redis: Redis) -> int:
    """Commands Redis has executed, those inside Lua scripts included (INFO commandstats)."""
    stats = await redis.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


async def flow_run(adapter: ArqAdapter, bp_id: str, trips: RoundTrips | None = None) -> tuple[float, int, int]:
    """One run: seconds, flowcraft's own round trips, and every Redis command (arq's too)."""
    trips_before = trips.count if trips else 0
    cmds_before = await commands_done(adapter.redis)
    t = time.perf_counter()
    run_id = await adapter.start_run(bp_id, {})
    await adapter.start(burst=True)
    elapsed = time.perf_counter() - t
    status = await adapter.status(run_id)
    assert status and status["status"] == "completed", status
    cmds = await commands_done(adapter.redis) - cmds_before - 2  # less the status read and one INFO
    return elapsed, (trips.count - trips_before - 2) if trips else 0, cmds


async def live_worker(redis: Redis, registry: NodeRegistry, bps: dict, bp_id: str, steps: int,
                      repeats: int) -> tuple[float, float]:
    """A long-running worker (not burst: woken, not polling): median seconds of a run started by a client
    while the worker idles, and the worker's idle Redis commands per second (5 s, nothing to do)."""
    options = {"registry": registry, "blueprints": bps}
    worker = ArqAdapter(connection=redis, queue_name="bench-live", concurrency=10, runtime_options=options)
    client = ArqAdapter(connection=redis, queue_name="bench-live", runtime_options=options)
    task = asyncio.ensure_future(worker.start())
    await asyncio.sleep(1.5)
    before, t0 = await commands_done(redis), time.monotonic()
    await asyncio.sleep(5)
    idle = (await commands_done(redis) - before - 1) / (time.monotonic() - t0)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run_id = await client.start_run(bp_id, {})
        while not await client.status(run_id):
            await asyncio.sleep(0.005)
        times.append(time.perf_counter() - t)
    worker.stop()
    await task
    await client.close()
    await worker.close()
    return statistics.median(times), idle


async def main(args: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    server = RedisServer()
    try:
        redis = Redis.from_url(server.url)
        registry = NodeRegistry({"noop": noop_node})
        bps = {bp.id: bp for bp in (parse_blueprint(chain(args.n), registry=registry),
                                     parse_blueprint(fan(args.n), registry=registry))}
        adapter = ArqAdapter(connection=redis, queue_name="bench-flow", concurrency=10, poll_delay_s=args.poll,
                             runtime_options={"registry": registry, "blueprints": bps})
        trips = RoundTrips(redis)
        rows = []
        bare = []
        for _ in range(args.repeats):
            before = await commands_done(redis)
            bare.append(await bare_arq(redis, args.n, args.poll))
            bare_cmds = (await commands_done(redis) - before) / args.n
        rows.append(("bare arq no-op jobs", args.n, statistics.median(bare), None, bare_cmds))
        for bp_id, steps in ((f"chain-{args.n}", args.n), (f"fan-{args.n}", args.n + 2)):
            before = adapter.store.conflicts
            results = [await flow_run(adapter, bp_id, trips) for _ in range(args.repeats)]
            print(f"  {bp_id}: {(adapter.store.conflicts - before) / args.repeats:.0f} transaction retries per run",
                  file=sys.stderr)
            rows.append((bp_id, steps, statistics.median(r[0] for r in results),
                         statistics.median(r[1] for r in results) / steps,
                         statistics.median(r[2] for r in results) / steps))
        live_t, idle = await live_worker(redis, registry, bps, f"chain-{args.n}", args.n, args.repeats)
        rows.append((f"chain-{args.n} (live)", args.n, live_t, None, float("nan")))
        base_rate = rows[0][1] / rows[0][2]
        print(f"flowcraft on arq: one process, worker max_jobs 10, poll {args.poll:g} s, median of {args.repeats}")
        print(f"{'case':<22}{'steps':>7}{'median':>10}{'steps/s':>10}{'vs bare arq':>13}"
              f"{'flowcraft trips/step':>22}{'redis cmds/step':>17}")
        for name, steps, t, per_trips, per_cmds in rows:
            rate = steps / t
            trips_text = "–" if per_trips is None else f"{per_trips:.1f}"
            if per_cmds != per_cmds:  # the live case: its commands are counted while it idles, below
                print(f"{name:<22}{steps:>7}{t:>9.2f}s{rate:>10,.0f}{rate / base_rate:>12.2f}x")
                continue
            print(f"{name:<22}{steps:>7}{t:>9.2f}s{rate:>10,.0f}{rate / base_rate:>12.2f}x"
                  f"{trips_text:>22}{per_cmds:>17.1f}")
        print(f"(live): a long-running worker, woken by enqueues instead of polling; idle, it sends "
              f"{idle:.1f} Redis commands/s (heartbeat and dead-worker checks included)")
        await adapter.close()
        await redis.aclose()
    finally:
        server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--poll", type=float, default=0.02, help="worker poll delay in seconds (flowcraft's default)")
    asyncio.run(main(p.parse_args()))
