"""RedisCoordinationStore: atomic counters, set-if-absent locks and TTLs (seed API), under
``flowcraft:coord:``. The engine keeps its own join state in the run's hashes; this store is for
callers that need a plain distributed lock or counter (the reconciler uses it for its sweep lock)."""

from __future__ import annotations

from redis.asyncio import Redis

from . import keys

# INCR and EXPIRE in one script: a crash between the two must not leave a counter that never expires
_INCR = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return v
"""


# delete only if the value is still the caller's: a lock that expired and was taken by someone else stays
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisCoordinationStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._incr = redis.register_script(_INCR)
        self._release = redis.register_script(_RELEASE)

    async def increment(self, key: str, ttl_s: int, by: int = 1) -> int:
        return int(await self._incr(keys=[keys.coord_key(key)], args=[by, ttl_s]))

    async def set_if_not_exist(self, key: str, value: str, ttl_s: int) -> bool:
        return bool(await self.redis.set(keys.coord_key(key), value, nx=True, ex=ttl_s if ttl_s > 0 else None))

    async def extend_ttl(self, key: str, ttl_s: int) -> bool:
        """``ttl_s <= 0`` keeps the key forever, as in ``increment`` and ``set_if_not_exist``."""
        if ttl_s <= 0:
            return bool(await self.redis.persist(keys.coord_key(key)))
        return bool(await self.redis.expire(keys.coord_key(key), ttl_s))

    async def delete(self, key: str) -> None:
        await self.redis.delete(keys.coord_key(key))

    async def get(self, key: str) -> str | None:
        raw = await self.redis.get(keys.coord_key(key))
        return raw.decode() if isinstance(raw, bytes) else raw

    async def release(self, key: str, value: str) -> bool:
        """Delete ``key`` only if it still holds ``value`` (a lock released by its owner)."""
        return bool(await self._release(keys=[keys.coord_key(key)], args=[value]))
