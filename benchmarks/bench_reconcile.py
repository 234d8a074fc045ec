"""One reconciler sweep over many run-state keys: its time and Redis commands per scanned key.

    python benchmarks/bench_reconcile.py                 # 100,000 runs (95% finished, 5% running, 200 stalled)
    python benchmarks/bench_reconcile.py --runs 10000    # smaller

It starts its own redis-server (unix socket, temp dir), fills it, then measures:
  * baseline: a bare ``SCAN MATCH workflow:state:* COUNT n`` loop over the same keys (no per-key work);
  * sweep: ``create_arq_reconciler(...).run()`` — the same SCAN plus one pipelined round trip per page.
Commands are counted with ``INFO commandstats`` deltas; each figure is the median of ``--repeats`` sweeps.
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

from redis.asyncio import Redis  # noqa: E402

from flowcraft_cli.distributed.adapter import ArqAdapter  # noqa: E402
from flowcraft_cli.distributed.keys import field_name, kind_key, progress_key  # noqa: E402
from flowcraft_cli.distributed.reconciler import create_arq_reconciler  # noqa: E402
from flowcraft_cli.jobs import Job  # noqa: E402
from flowcraft_cli.loading import parse_blueprint  # noqa: E402
from flowcraft_cli.registry import NodeRegistry  # noqa: E402
from flowcraft_cli.store import NODES, OUTBOX, RUN, STATE, dumps  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


async def commands(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))


async def fill(redis: Redis, n: int, running_pct: float, stalled: int, version: str) -> None:
    now = int(time.time() * 1000)
    n_running = int(n * running_pct)
    pipe = redis.pipeline(transaction=False)
    for i in range(n):
        run_id = f"bench-{i:06d}"
        status = "running" if i < n_running else "completed"
        pipe.hset(kind_key(STATE, run_id), mapping={"blueprintId": '"one"', "_outputs.x": '"done"'})
        pipe.hset(kind_key(RUN, run_id), mapping={"status": dumps(status), "blueprint_id": '"one"',
                                                  "blueprint_version": dumps(version), "pending": "1",
                                                  "awaiting_nodes": "[]", "updated_at": str(now)})
        pipe.set(progress_key(run_id), now)
        if i < stalled:  # a step committed but never queued
            job = Job(run_id, "x", 1)
            pipe.hset(kind_key(NODES, run_id), field_name(NODES, "x"), dumps({"status": "queued", "seq": 1, "gen": 0, "attempt": 1,
                                                            "phase": "exec", "runs": 0}))
            pipe.hset(kind_key(OUTBOX, run_id), job.job_id, dumps(job.to_dict()))
        if len(pipe) > 5000:
            await pipe.execute()
    await pipe.execute()


async def main(args: argparse.Namespace) -> None:
    server = RedisServer()
    try:
        redis = Redis.from_url(server.url)
        registry = NodeRegistry({"noop": lambda ctx: None})
        bp = parse_blueprint({"id": "one", "nodes": [{"id": "x", "uses": "noop"}], "edges": []}, registry=registry)
        adapter = ArqAdapter(connection=redis, queue_name="bench-queue",
                             runtime_options={"registry": registry, "blueprints": {"one": bp}})
        t0 = time.perf_counter()
        await fill(redis, args.runs, args.running, args.stalled, bp.version)
        print(f"filled {args.runs:,} runs ({await redis.dbsize():,} keys) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        await asyncio.sleep(1.1)  # let the progress keys' idle time pass the 1 s threshold (1 s LRU resolution)

        base_t, base_c, sweep_t, sweep_c = [], [], [], []
        for rep in range(args.repeats):
            c0, t = await commands(redis), time.perf_counter()
            cursor, scanned = 0, 0
            while True:
                cursor, page = await redis.scan(cursor=cursor, match="workflow:state:*", count=args.scan_count)
                scanned += len(page)
                if cursor == 0:
                    break
            base_t.append(time.perf_counter() - t)
            base_c.append(await commands(redis) - c0 - 1)
            rec = create_arq_reconciler(adapter=adapter, redis=redis, stalled_threshold_seconds=1,
                                        scan_count=args.scan_count, dry_run=rep > 0)
            c0, t = await commands(redis), time.perf_counter()
            stats = await rec.run()
            sweep_t.append(time.perf_counter() - t)
            sweep_c.append(await commands(redis) - c0 - 1)
            print(f"  sweep {rep + 1}: {stats.counts()}", file=sys.stderr)
        n = args.runs
        bt, st = statistics.median(base_t), statistics.median(sweep_t)
        print(f"reconciler sweep over {n:,} run-state keys ({args.running:.0%} running, {args.stalled} stalled), "
              f"SCAN COUNT {args.scan_count}, median of {args.repeats}")
        print(f"  baseline SCAN only : {bt:7.3f} s   {statistics.median(base_c) / n:5.2f} commands/key")
        print(f"  reconciler sweep   : {st:7.3f} s   {statistics.median(sweep_c) / n:5.2f} commands/key"
              f"   ({n / st:,.0f} keys/s, {st / bt:.1f}x the bare SCAN)")
        pages = -(-n // args.scan_count)
        print(f"  round trips        : ~{2 * pages} for {n:,} keys (a SCAN and one script call per page; commands"
              " run inside the script count in commands/key)")
        print("  (sweep 1 queues the stalled runs' lost steps; later sweeps see those jobs alive in the queue"
              " and find nothing stalled)")
        await adapter.close()
        await redis.aclose()
    finally:
        server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--running", type=float, default=0.05, help="share of runs still running (default 0.05)")
    p.add_argument("--stalled", type=int, default=200)
    p.add_argument("--scan-count", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(p.parse_args()))
