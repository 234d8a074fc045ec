"""RedisContext: one run's context, the hash ``workflow:state:<run_id>`` with JSON values (seed API)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from ..store import STATE, dumps, loads
from . import keys

# KEYS[1] the run's state hash; ARGV: [1] field, [2] JSON value, [3] running TTL in s (0 = forever).
# HSET keeps a key's expiry, but a key it creates has none: give that one the running TTL, as a step would.
_SET = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if tonumber(ARGV[3]) > 0 and redis.call('TTL', KEYS[1]) == -1 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
"""


class RedisContext:
    """Values are always JSON: ``None`` is stored as ``null``, never as an empty string (B1). A ``set`` keeps
    the hash's expiry, or gives a hash without one ``running_ttl_s`` (``state.running_ttl_seconds``)."""

    def __init__(self, redis: Redis, run_id: str, *, running_ttl_s: int = 7 * 86400) -> None:
        self.redis = redis
        self.run_id = run_id
        self.key = keys.kind_key(STATE, run_id)
        self.running_ttl_s = running_ttl_s
        self._set = redis.register_script(_SET)

    async def get(self, key: str, default: Any = None) -> Any:
        raw = await self.redis.hget(self.key, key)
        return default if raw is None else loads(raw, where=f"run {self.run_id!r}: context key {key!r}")

    async def set(self, key: str, value: Any) -> None:
        await self._set(keys=[self.key], args=[key, dumps(value), self.running_ttl_s])

    async def has(self, key: str) -> bool:
        return bool(await self.redis.hexists(self.key, key))

    async def delete(self, key: str) -> None:
        await self.redis.hdel(self.key, key)

    async def to_dict(self) -> dict[str, Any]:
        raw = await self.redis.hgetall(self.key)
        out = {}
        for k, v in raw.items():
            name = k.decode() if isinstance(k, bytes) else k
            out[name] = loads(v, where=f"run {self.run_id!r}: context key {name!r}")
        return out
