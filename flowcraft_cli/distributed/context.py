"""RedisContext: one run's context, the hash ``workflow:state:<run_id>`` with JSON values (seed API)."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from ..store import STATE, dumps
from . import keys


class RedisContext:
    """Values are always JSON: ``None`` is stored as ``null``, never as an empty string (B1)."""

    def __init__(self, redis: Redis, run_id: str) -> None:
        self.redis = redis
        self.run_id = run_id
        self.key = keys.kind_key(STATE, run_id)

    async def get(self, key: str, default: Any = None) -> Any:
        raw = await self.redis.hget(self.key, key)
        return default if raw is None else json.loads(raw)

    async def set(self, key: str, value: Any) -> None:
        await self.redis.hset(self.key, key, dumps(value))

    async def has(self, key: str) -> bool:
        return bool(await self.redis.hexists(self.key, key))

    async def delete(self, key: str) -> None:
        await self.redis.hdel(self.key, key)

    async def to_dict(self) -> dict[str, Any]:
        raw = await self.redis.hgetall(self.key)
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}
