"""Commands that act on runs already in Redis (``inspect``, ``runs``, ``cancel``, ``reconcile``) need only the
Redis URL and the queue name (CONTRACT §10): settings, no blueprint files, no node modules, any directory.
A blueprint these commands need comes from the definition its run recorded in Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from .config import Settings, load_settings
from .project import connect_redis

if TYPE_CHECKING:
    from .distributed.adapter import ArqAdapter
    from .distributed.views import RunReader


@asynccontextmanager
async def open_reader(config: str | None = None) -> AsyncIterator[RunReader]:
    """A RunReader on a checked connection (no arq, no engine imported)."""
    from .distributed.views import RunReader

    s = load_settings(config)
    redis = await connect_redis(s.redis.url)
    try:
        yield RunReader(redis, s.queue.name, lease_s=s.worker.lease_seconds)
    finally:
        await redis.aclose()


@asynccontextmanager
async def open_remote_adapter(config: str | None = None, overrides: Mapping[str, Any] | None = None,
                              ) -> AsyncIterator[tuple[ArqAdapter, Settings]]:
    """An ArqAdapter with no blueprints or nodes of its own, for commands that change runs (cancel,
    reconcile): the engine finds each run's blueprint in Redis. It never runs a node."""
    from .distributed.adapter import ArqAdapter

    s = load_settings(config, overrides=overrides)
    redis = await connect_redis(s.redis.url)
    adapter = ArqAdapter(connection=redis, queue_name=s.queue.name, lease_s=s.worker.lease_seconds,
                         ttl_s=s.state.ttl_seconds, running_ttl_s=s.state.running_ttl_seconds,
                         version_grace_s=s.worker.version_grace_seconds)
    try:
        yield adapter, s
    finally:
        await adapter.close()
        await redis.aclose()
