"""``flowcraft runs`` over a large run index: the time of one listing, through the library call the CLI uses
(``RunReader.list_runs``).

    python benchmarks/bench_runs.py                 # 100,000 finished runs, 0.1% of them failed
    python benchmarks/bench_runs.py --runs 10000    # smaller

It starts its own redis-server (unix socket, temp dir), fills the run index of one queue and each run's meta
hash with pipelines (as run starts and ends would), then times, as the median of ``--repeats`` listings:
  * baseline: one bare ``ZREVRANGE`` of ``--limit`` entries of the index (no meta read);
  * ``runs --limit N``: the newest N runs;
  * ``runs --status failed --limit N``: where few runs failed (read from the failed group's index);
  * ``runs --blueprint ID --limit N``: a filter the index does not cover, matching 1 run in 10.
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

from flowcraft_cli.distributed import keys  # noqa: E402
from flowcraft_cli.distributed.views import RunReader  # noqa: E402
from flowcraft_cli.store import RUN, dumps  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

QUEUE = "bench-queue"


async def fill(redis: Redis, n: int, failed_every: int) -> int:
    now = int(time.time() * 1000)
    failed = 0
    pipe = redis.pipeline(transaction=False)
    for i in range(n):
        run_id = f"run-{i:07d}"
        created = now - (n - i) * 1000
        status = "failed" if i % failed_every == 0 else "completed"
        failed += status == "failed"
        pipe.hset(keys.kind_key(RUN, run_id), mapping={
            "status": dumps(status), "blueprint_id": dumps(f"bp-{i % 10}"), "blueprint_version": '"1"',
            "created_at": created, "finished_at": created + 250, "reason": dumps(None),
            "failed_node": dumps("charge" if status == "failed" else None)})
        pipe.zadd(keys.runs_by_status_key(keys.run_group(status), QUEUE), {run_id: created})
        pipe.zadd(keys.runs_expiry_key(QUEUE), {run_id: created + 86_400_000})
        if len(pipe) > 20_000:
            await pipe.execute()
    await pipe.execute()
    return failed


async def timed(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = await fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, result


async def main(args: argparse.Namespace) -> None:
    server = RedisServer()
    try:
        redis = Redis.from_url(server.url)
        t0 = time.perf_counter()
        failed = await fill(redis, args.runs, args.failed_every)
        print(f"filled {args.runs:,} finished runs ({failed:,} failed) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        reader = RunReader(redis, QUEUE)
        n = args.limit
        rows = [
            ("baseline: ZREVRANGE of one group", lambda: redis.zrevrange(
                keys.runs_by_status_key("completed", QUEUE), 0, n - 1)),
            (f"runs --limit {n}", lambda: reader.list_runs(limit=n)),
            (f"runs --status failed --limit {n}", lambda: reader.list_runs(status="failed", limit=n)),
            (f"runs --blueprint bp-3 --limit {n}", lambda: reader.list_runs(blueprint_id="bp-3", limit=n)),
        ]
        print(f"{'listing':<40} {'median ms':>10} {'rows':>5}")
        for label, fn in rows:
            ms, result = await timed(args.repeats, fn)
            print(f"{label:<40} {ms:>10.2f} {len(result):>5}")  # type: ignore[arg-type]
        await redis.aclose()
    finally:
        server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--failed-every", type=int, default=1000, help="one run in this many failed")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--repeats", type=int, default=21)
    asyncio.run(main(p.parse_args()))
