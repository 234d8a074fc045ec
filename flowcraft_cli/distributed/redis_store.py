"""RedisStore: the engine's Store on Redis. A transaction WATCHes the run's meta hash, reads lazily,
then writes everything in one MULTI/EXEC; every writing transaction bumps the meta hash's ``rev``, so
two workers finishing predecessors of the same join serialize instead of both counting stale state."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import WatchError

from ..errors import UndecodableValue
from ..store import KINDS, MISSING, RUN, Store, Txn, dumps, loads
from . import keys
from .workers import STEPS_TTL_S

T = TypeVar("T")
EVENT_CAP = 10_000
# Extend keys' expiry, never shorten it: KEYS are an ancestor run's keys, ARGV[1] the expiry (ms) a child's
# transaction gives its own keys, 0 = none. A key with a longer TTL, or none, keeps it; a missing key stays
# missing. (EXPIRE ... GT would do, but needs Redis 7 and the contract promises 6.2.)
_EXTEND_EXPIRY = """
local ms = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  local left = redis.call('PTTL', key)
  if left >= 0 and (ms <= 0 or left < ms) then
    if ms <= 0 then redis.call('PERSIST', key) else redis.call('PEXPIRE', key, ms) end
  end
end
return 0
"""
# A run starts: store its blueprint's document. KEYS[1] the definition key, ARGV[1] the document, ARGV[2] the
# expiry (ms) the run's keys get, 0 = none. The key keeps a longer expiry (or none) that an earlier run gave it.
_RECORD_DEFINITION = """
local ms = tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
if ms > 0 and left ~= -1 then
  if left > ms then ms = left end
  redis.call('PEXPIRE', KEYS[1], ms)
end
return 0
"""
# Index entries expire with their runs. KEYS: keys.run_index_keys(queue) (all runs, expiry, then the status
# groups); ARGV[1] now (ms), ARGV[2] the run meta key prefix, ARGV[3] how many due entries to look at. An entry
# whose recorded expiry has passed is dropped everywhere if its run is gone, else re-dated to the run's real
# expiry (steps extend a running run's keys without touching the index).
_TRIM_INDEX = """
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, run_id in ipairs(due) do
  local left = redis.call('PTTL', ARGV[2] .. run_id)
  if left == -2 then
    for i = 1, #KEYS do redis.call('ZREM', KEYS[i], run_id) end
  elseif left == -1 then
    redis.call('ZADD', KEYS[2], '+inf', run_id)
  else
    redis.call('ZADD', KEYS[2], now + left, run_id)
  end
end
return #due
"""
# The index keys of a queue live as long as its longest-lived run: KEYS the index keys, ARGV[1] the expiry (ms)
# this transaction gives its run's keys, 0 = none. A key gets at least that (a new sorted set has none yet).
_KEEP_INDEX = """
local ms = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  if ms <= 0 then
    redis.call('PERSIST', key)
  else
    local left = redis.call('PTTL', key)
    if left == -1 or (left >= 0 and left < ms) then redis.call('PEXPIRE', key, ms) end
  end
end
return 0
"""
TRIM_BATCH = 100  # due index entries looked at per write: more than runs start or end between two writes


def _resets_expiry(txn: Txn) -> bool:
    """Does this transaction set the expiry of everything its run touches (the run's keys, its blueprint's
    definition, its queue's index)? At the run's start and end, a retry, and a sleep that asks for longer;
    other transactions only refresh it now and then (``RedisStore._due``)."""
    return txn.final is not None or txn.unfinal or txn.started is not None or txn.ttl_s is not None


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class _RedisTxn(Txn):
    def __init__(self, run_id: str, pipe: Any) -> None:
        super().__init__(run_id)
        self._pipe = pipe

    async def _load(self, kind: str, fields: list[str]) -> list[str | bytes | None]:
        return list(await self._pipe.hmget(keys.kind_key(kind, self.run_id), fields))  # decoded by Txn

    async def _load_all(self, kind: str) -> dict[str, str | bytes]:
        raw = await self._pipe.hgetall(keys.kind_key(kind, self.run_id))
        return {_s(k): v for k, v in raw.items()}


class RedisStore(Store):
    """``queue_name``: the queue whose run index (``keys.runs_key``) a run's start and status changes are
    written to; without one, no index is kept."""

    def __init__(self, redis: Redis, *, running_ttl_s: int = 7 * 86400, queue_name: str | None = None) -> None:
        self.redis = redis
        self.running_ttl_s = running_ttl_s
        self.queue_name = queue_name
        self.conflicts = 0  # transactions retried because another step of the same run committed first
        self._kept: dict[str, float] = {}  # key -> when this process last extended its expiry (monotonic s)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # run id -> (lock, callers holding or waiting)

    async def transact(self, run_id: str, fn: Callable[[Txn], Awaitable[T]]) -> T:
        # Steps of one run inside this process take turns: optimistic locking then only has to settle races
        # with other processes, instead of siblings of a wide fan-in retrying each other's work here.
        lock, users = self._locks.get(run_id) or (asyncio.Lock(), 0)
        self._locks[run_id] = (lock, users + 1)
        try:
            async with lock:
                return await self._transact(run_id, fn)
        finally:
            lock, users = self._locks[run_id]
            if users == 1:
                del self._locks[run_id]  # nobody else waits on it: forget it, so the dict stays small
            else:
                self._locks[run_id] = (lock, users - 1)

    async def _transact(self, run_id: str, fn: Callable[[Txn], Awaitable[T]]) -> T:
        meta_key = keys.kind_key(RUN, run_id)
        tries = 0
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(meta_key)
                    txn = _RedisTxn(run_id, pipe)
                    result = await fn(txn)
                    if not txn.dirty:
                        await pipe.reset()
                        return result
                    # read before MULTI, inside the WATCH: what the definition and the index writes need
                    # (usually cached already: every step reads the run's meta)
                    try:
                        meta = await txn.get_many(RUN, ("blueprint_id", "blueprint_version", "created_at",
                                                        "queue"))
                    except UndecodableValue:
                        meta = {}
                    pipe.multi()
                    self._queue_writes(pipe, txn)
                    self._queue_catalog_writes(pipe, txn, meta)
                    await pipe.execute()
                    if self.on_commit is not None:
                        self.on_commit(txn)
                    return result
                except WatchError:
                    # another step of this run committed first: recompute on fresh state, after a short random
                    # pause so that a crowd of siblings finishing together (a wide fan-in) spreads out
                    self.conflicts += 1
                    tries += 1
            await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * tries)))

    def _queue_writes(self, pipe: Any, txn: Txn) -> None:
        run_id = txn.run_id
        sets: dict[str, dict[str, str]] = {}
        dels: dict[str, list[str]] = {}
        for (kind, field), value in txn._writes.items():
            if value is MISSING:
                dels.setdefault(kind, []).append(field)
            else:
                sets.setdefault(kind, {})[field] = dumps(value)
        for kind, mapping in sets.items():
            pipe.hset(keys.kind_key(kind, run_id), mapping=mapping)
        for kind, fields in dels.items():
            pipe.hdel(keys.kind_key(kind, run_id), *fields)
        pipe.hincrby(keys.kind_key(RUN, run_id), "rev", 1)
        now = int(time.time() * 1000)
        pipe.hset(keys.kind_key(RUN, run_id), "updated_at", now)
        pipe.set(keys.progress_key(run_id), now)
        if txn.events:
            ek = keys.events_key(run_id)
            pipe.rpush(ek, *(dumps(e) for e in txn.events))
            pipe.ltrim(ek, -EVENT_CAP, -1)
        ttl = self.running_ttl_s if txn.ttl_s is None else txn.ttl_s  # the engine may ask for longer (sleeps)
        if txn.unfinal:
            pipe.delete(keys.status_key(run_id))
        if txn.final is not None:
            doc, ttl = txn.final
            pipe.set(keys.status_key(run_id), dumps(doc))
        # Expiry: every key this transaction writes gets the run's TTL (so a run nobody finishes still goes
        # away, and a key created mid-run never lives forever); every key of the run gets it when the run
        # starts, ends, or asks for longer (a sleep), and otherwise at most every min(60 s, TTL/4) per process,
        # so that a key no step writes for a while (the context during a long node) does not lapse alone.
        written = {keys.kind_key(kind, run_id) for kind, _ in txn._writes}
        written |= {keys.kind_key(RUN, run_id), keys.progress_key(run_id)}
        if txn.events:
            written.add(keys.events_key(run_id))
        if _resets_expiry(txn) or self._due(f"run:{run_id}", ttl * 1000 if ttl and ttl > 0 else 0):
            written = set(keys.run_keys(run_id))
        for key in sorted(written):
            if ttl and ttl > 0:
                pipe.expire(key, ttl)
            else:
                pipe.persist(key)
        self._extend_ancestors(pipe, txn, ttl)
        for worker_id, job_id, job in txn.listing:  # a claim lists its step under its worker, a commit unlists it
            steps = keys.worker_steps_key(worker_id)
            if job is None:
                pipe.hdel(steps, job_id)
            else:
                pipe.hset(steps, job_id, dumps(job))
                pipe.expire(steps, STEPS_TTL_S)

    def _ttl_of(self, txn: Txn) -> int | None:
        return txn.final[1] if txn.final is not None else self.running_ttl_s if txn.ttl_s is None else txn.ttl_s

    def _queue_catalog_writes(self, pipe: Any, txn: Txn, meta: dict[str, Any]) -> None:
        """The blueprint definition the run uses (recorded at its start, then kept at least as long as the
        run's own keys), and the queue's run index (at start, at the end, and on every status change)."""
        ttl = self._ttl_of(txn)
        ms = ttl * 1000 if ttl and ttl > 0 else 0
        if txn.started is not None:
            from .definitions import document_of

            bp = txn.started
            pipe.eval(_RECORD_DEFINITION, 1, keys.blueprint_key(bp.id, bp.version), document_of(bp), ms)
            if self.queue_name is not None:  # whose reconciler may judge it (another project's may not)
                pipe.hset(keys.kind_key(RUN, txn.run_id), "queue", dumps(self.queue_name))
        elif meta.get("blueprint_id") and meta.get("blueprint_version"):
            key = keys.blueprint_key(meta["blueprint_id"], meta["blueprint_version"])
            if _resets_expiry(txn) or self._due(key, ms):
                pipe.eval(_EXTEND_EXPIRY, 1, key, ms)
        # the index of the queue the run was started on (a client configured for another queue may cancel it)
        queue = self.queue_name if txn.started is not None else meta.get("queue")
        if not isinstance(queue, str):
            return  # no index (a store without a queue, or a run that recorded none)
        index = keys.run_index_keys(queue)
        status = txn._writes.get((RUN, "status"), MISSING)
        run_id = txn.run_id
        now = int(time.time() * 1000)
        created = meta.get("created_at") if isinstance(meta.get("created_at"), int) else now
        if isinstance(status, str):
            group = keys.run_group(status)
            pipe.zadd(keys.runs_by_status_key(group, queue), {run_id: created})
            for other in keys.RUN_GROUPS:
                if other != group:
                    pipe.zrem(keys.runs_by_status_key(other, queue), run_id)
        ends = txn.started is not None or txn.final is not None
        if ends:
            pipe.zadd(keys.runs_key(queue), {run_id: created})
            pipe.zadd(keys.runs_expiry_key(queue), {run_id: now + ms if ms else "+inf"})
            pipe.eval(_TRIM_INDEX, len(index), *index, now, keys.kind_key(RUN, ""), TRIM_BATCH)
        if _resets_expiry(txn) or isinstance(status, str) or self._due(index[0], ms):
            pipe.eval(_KEEP_INDEX, len(index), *index, ms)  # last: a sorted set created above has no expiry yet

    def _due(self, key: str, ttl_ms: int) -> bool:
        """Is it time to extend ``key``'s expiry again? Keys every step would otherwise touch (a blueprint's
        definition, a queue's run index) are extended by this process at most every quarter of their TTL
        (and at most every minute): their TTL is days, a step is milliseconds."""
        now = time.monotonic()
        every_s = 60.0 if ttl_ms <= 0 else min(60.0, ttl_ms / 4000)
        if now - self._kept.get(key, -1e18) < every_s:
            return False
        if len(self._kept) > 10_000:
            self._kept.clear()  # bounded: forgetting only means one more refresh
        self._kept[key] = now
        return True

    def _extend_ancestors(self, pipe: Any, txn: Txn, ttl: int | None) -> None:
        """A parent run's keys live at least as long as any of its live child runs (CONTRACT §6.1): while
        the child runs (or sleeps) for longer than the running TTL, nothing else refreshes its parent's."""
        if txn.ancestors:
            ancestor_keys = [key for run_id in txn.ancestors for key in keys.run_keys(run_id)]
            pipe.eval(_EXTEND_EXPIRY, len(ancestor_keys), *ancestor_keys, ttl * 1000 if ttl and ttl > 0 else 0)

    async def read(self, run_id: str, kind: str, fields: list[str]) -> list[Any]:
        if not fields:
            return []
        values = await self.redis.hmget(keys.kind_key(kind, run_id), fields)
        return [MISSING if v is None else loads(v, where=f"run {run_id!r}: {kind} field {f!r}")
                for f, v in zip(fields, values, strict=True)]

    async def read_all(self, run_id: str, kind: str, *, lenient: bool = False) -> dict[str, Any]:
        raw = await self.redis.hgetall(keys.kind_key(kind, run_id))
        return {_s(k): loads(v, lenient=lenient, where=f"run {run_id!r}: {kind} field {_s(k)!r}")
                for k, v in raw.items()}

    async def read_status(self, run_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(keys.status_key(run_id))
        return None if raw is None else json.loads(_s(raw))

    async def read_events(self, run_id: str) -> list[dict[str, Any]]:
        return [json.loads(_s(e)) for e in await self.redis.lrange(keys.events_key(run_id), 0, -1)]

    async def _ack(self, run_id: str, job_ids: list[str]) -> None:
        from ..store import OUTBOX

        await self.redis.hdel(keys.kind_key(OUTBOX, run_id), *job_ids)


assert set(KINDS) <= set(keys._KIND_PREFIX)
