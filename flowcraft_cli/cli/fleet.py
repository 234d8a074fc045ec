"""Fleet views (CONTRACT §10): ``flowcraft workers`` and ``flowcraft queue``. Each needs only the Redis URL
and the queue name: no blueprint files and no node modules are loaded."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from . import render

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="Config file (default: $FLOWCRAFT_CONFIG, else ./flowcraft.yaml).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout and nothing else.")]


def register(app: typer.Typer) -> None:
    app.command("workers")(workers)
    app.command("queue")(queue)


def workers(json_out: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List the queue's live workers, and those lost within the last lease (stopped heartbeating)."""
    from ..config import load_settings
    from ..distributed.workers import WorkerRegistry
    from ..project import connect_redis

    s = load_settings(config)

    async def go() -> tuple[int, list[Any]]:
        redis = await connect_redis(s.redis.url)
        try:
            return await WorkerRegistry(redis, s.queue.name, "", s.worker.lease_seconds).fleet()
        finally:
            await redis.aclose()

    now, found = asyncio.run(go())
    rows = [worker_row(w, now) for w in found]
    if json_out:
        render.print_json({"queue": s.queue.name, "lease_seconds": s.worker.lease_seconds, "workers": rows})
    else:
        render.workers_table(s.queue.name, rows)


def worker_row(w: Any, now_ms: int) -> dict[str, Any]:
    f = w.fields
    return {
        "worker_id": w.worker_id, "status": "alive" if w.alive else "lost", "host": f.get("host"),
        "pid": f.get("pid"), "queue": f.get("queue"), "concurrency": f.get("concurrency"),
        "steps_running": f.get("running"), "blueprints": dict(f.get("blueprints") or {}),
        "started_at": f.get("started_at"),
        "heartbeat_age_ms": max(0, now_ms - w.heartbeat_at) if w.heartbeat_at is not None else None,
    }


def queue(json_out: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show how deep the queue is: jobs ready, deferred (retries, sleeps), in progress, oldest ready job's age."""
    from ..config import load_settings
    from ..distributed.queue import ArqQueue, arq_pool_for
    from ..project import connect_redis

    s = load_settings(config)

    async def go() -> Any:
        redis = await connect_redis(s.redis.url)
        q = ArqQueue(arq_pool_for(redis, s.queue.name), s.queue.name)
        try:
            return await q.counts()
        finally:
            await q.close()
            await redis.aclose()

    counts = asyncio.run(go())
    if json_out:
        render.print_json(counts.to_json())
    else:
        render.queue_table(counts.to_json())
