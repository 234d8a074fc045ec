"""Node steps per second through arq + Redis, against bare arq on the same worker settings.

    python benchmarks/bench_distributed.py            # chain of 300, fan-out/in of 300, 3 runs each
    python benchmarks/bench_distributed.py --n 1000

One process, one redis-server it starts itself (unix socket), one arq worker in burst mode with the same
settings flowcraft uses (max_jobs 10, poll_delay 0.02 s, JSON jobs). Baseline: N bare arq no-op jobs queued
at once, then drained. Each flowcraft node step is one arq job plus the engine's claim and commit
transactions, so the ratio shows what the engine costs per step over the queue itself.
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
from flowcraft_cli.loader import parse_blueprint  # noqa: E402
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


async def flow_run(adapter: ArqAdapter, bp_id: str) -> float:
    t = time.perf_counter()
    run_id = await adapter.start_run(bp_id, {})
    await adapter.start(burst=True)
    elapsed = time.perf_counter() - t
    status = await adapter.status(run_id)
    assert status and status["status"] == "completed", status
    return elapsed


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
        rows = []
        bare = [await bare_arq(redis, args.n, args.poll) for _ in range(args.repeats)]
        rows.append(("bare arq no-op jobs", args.n, statistics.median(bare)))
        for bp_id, steps in ((f"chain-{args.n}", args.n), (f"fan-{args.n}", args.n + 2)):
            before = adapter.store.conflicts
            times = [await flow_run(adapter, bp_id) for _ in range(args.repeats)]
            print(f"  {bp_id}: {(adapter.store.conflicts - before) / args.repeats:.0f} transaction retries per run",
                  file=sys.stderr)
            rows.append((bp_id, steps, statistics.median(times)))
        base_rate = rows[0][1] / rows[0][2]
        print(f"flowcraft on arq: one process, worker max_jobs 10, poll {args.poll:g} s, median of {args.repeats}")
        print(f"{'case':<22}{'steps':>7}{'median':>10}{'steps/s':>10}{'vs bare arq':>13}")
        for name, steps, t in rows:
            rate = steps / t
            print(f"{name:<22}{steps:>7}{t:>9.2f}s{rate:>10,.0f}{rate / base_rate:>12.2f}x")
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
