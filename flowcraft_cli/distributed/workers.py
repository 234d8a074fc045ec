"""The worker registry and heartbeat leases (CONTRACT §6.1).

A worker is alive while ``flowcraft:worker:<id>`` exists: every heartbeat (each ``lease_s / 3``) rewrites it
with a ``lease_s`` expiry, on the Redis server's clock, so clock skew between machines cannot make a live
worker look dead. Each step a worker holds is listed in ``flowcraft:worker-steps:<id>`` by the transaction
that claims it, until the one that commits it. When a worker dies its key expires ``lease_s`` after its last
heartbeat, while its steps list stays: that list is exactly what another worker (or the reconciler) must
recover. A step is *held* while its worker is alive and lists it. arq's own lock on a job lasts one lease and
is renewed by the heartbeat too: it covers the moments a job runs on a worker without being listed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from ..jobs import Job
from . import keys

# One heartbeat, one round trip. KEYS: [1] worker hash, [2] the queue's workers zset, [3] worker steps hash,
# [4] the queue's workers-seen hash. ARGV: [1] lease ms, [2] worker id, [3] worker key prefix, [4] steps-list
# ttl ms, [5] the fields as one JSON object, [6..] field, value pairs.
# Writes the worker's fields with heartbeat_at = server time, renews its expiry, keeps a copy of its fields
# for `flowcraft workers` (dropping copies of workers gone for more than a lease), and returns
# {server time ms, ids of this queue's workers whose key is gone (dead: their steps need recovery),
#  this worker's listed steps, the oldest heartbeat of the queue's workers}. Keys of other workers are derived inside the script (standalone Redis).
_BEAT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'heartbeat_at', now, unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], lease)
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[4]) end
local seen = redis.call('HGETALL', KEYS[4])
for i = 1, #seen, 2 do
  local ok, entry = pcall(cjson.decode, seen[i + 1])
  if not ok or type(entry) ~= 'table' or tonumber(entry.heartbeat_at) == nil
      or tonumber(entry.heartbeat_at) < now - 2 * lease and redis.call('EXISTS', ARGV[3] .. seen[i]) == 0 then
    redis.call('HDEL', KEYS[4], seen[i])
  end
end
redis.call('HSET', KEYS[4], ARGV[2], '{"heartbeat_at":' .. now .. ',"fields":' .. ARGV[5] .. '}')
redis.call('PEXPIRE', KEYS[4], ARGV[4])
local dead = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - lease)) do
  if redis.call('EXISTS', ARGV[3] .. id) == 0 then dead[#dead + 1] = id end
end
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or now
return {now, dead, redis.call('HKEYS', KEYS[3]), tostring(oldest)}
"""

# The queue's workers whose key is gone. KEYS: [1] the queue's workers zset; ARGV: [1] lease ms, [2] worker
# key prefix. Returns {dead ids, the oldest heartbeat of the queue's workers, server time} (ms).
_DEAD = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local dead = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))) do
  if redis.call('EXISTS', ARGV[2] .. id) == 0 then dead[#dead + 1] = id end
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or now
return {dead, tostring(oldest), tostring(now)}
"""

# A step is held when its worker is alive and still lists it. KEYS: [1] worker hash, [2] steps hash;
# ARGV: [1] arq job id.
_HELD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HEXISTS', KEYS[2], ARGV[1])
"""

# Forget what was recovered of a worker that stopped heartbeating. KEYS: [1] worker hash, [2] steps hash,
# [3] the queue's workers zset; ARGV: [1] worker id, [2..] the recovered job ids. Only those listings go, and only
# while the worker is still gone: one that came back meanwhile (a long pause) keeps its whole list, since a step
# the recovery found held is its own and goes on under its entry (so may the successors its commits claim);
# its own heartbeat lets go of those it no longer runs. A worker is dropped from the zset only once it is
# gone and lists nothing.
_FORGET = """
if #ARGV > 1 and redis.call('EXISTS', KEYS[1]) == 0 then redis.call('HDEL', KEYS[2], unpack(ARGV, 2)) end
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 1
end
return 0
"""

# How long a worker's steps list survives it when no other worker ever looks (nobody serves the queue any
# more): long enough for a fleet restart, short enough not to leak.
STEPS_TTL_S = 7 * 86400


@dataclass
class WorkerInfo:
    worker_id: str
    alive: bool
    heartbeat_at: int | None  # server ms
    fields: dict[str, Any]

    @property
    def blueprints(self) -> dict[str, str]:
        return dict(self.fields.get("blueprints") or {})


class WorkerRegistry:
    def __init__(self, redis: Redis, queue_name: str, worker_id: str, lease_s: float) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.worker_id = worker_id
        self.lease_ms = max(1, int(lease_s * 1000))
        self._beat = redis.register_script(_BEAT)
        self._held = redis.register_script(_HELD)
        self._dead = redis.register_script(_DEAD)
        self._forget = redis.register_script(_FORGET)
        self.last_beat: float | None = None  # monotonic time of the last heartbeat that reached Redis
        # since when (monotonic) every heartbeat reached Redis within 2/3 of a lease of the one before: this
        # worker's lease cannot have lapsed since then (and so none of its steps been recovered elsewhere)
        self.held_since: float | None = None
        self._server_offset_ms: int | None = None  # Redis server clock minus this host's, at the last heartbeat
        self._first_death_ms: int | None = None  # server time before which no worker of the queue can be dead

    async def beat(self, info: Mapping[str, Any]) -> tuple[int, list[str], list[str]]:
        """Heartbeat: returns (server time ms, dead workers of this queue, the steps this worker lists)."""
        args: list[Any] = [self.lease_ms, self.worker_id, keys.WORKER_PREFIX, STEPS_TTL_S * 1000,
                           json.dumps(dict(info), separators=(",", ":"))]
        for name, value in info.items():
            args += [name, json.dumps(value, separators=(",", ":"))]
        now, dead, mine, oldest = await self._beat(
            keys=[keys.worker_key(self.worker_id), keys.workers_key(self.queue_name),
                  keys.worker_steps_key(self.worker_id), keys.workers_seen_key(self.queue_name)], args=args)
        beat_at = time.monotonic()
        if self.last_beat is None or self.held_since is None or beat_at - self.last_beat > self.lease_ms / 1500:
            self.held_since = beat_at  # (the first beat, or after a gap in which the lease may have lapsed)
        self.last_beat = beat_at
        self._server_offset_ms = int(now) - int(time.time() * 1000)
        self._first_death_ms = int(float(oldest)) + self.lease_ms
        return int(now), [_s(d) for d in dead], [_s(m) for m in mine]

    def held_throughout(self, since: float) -> bool:
        """Has this worker held its lease without a break from ``since`` (monotonic) until now, with a third of a
        lease to spare? Not across a pause or a Redis outage longer than that (its steps may be recovered
        elsewhere). Heartbeats come every third of a lease (at most a second late)."""
        return self.held_since is not None and self.last_beat is not None and since >= self.held_since \
            and time.monotonic() - self.last_beat < self.lease_ms / 1500

    async def dead_workers(self) -> list[str]:
        """Workers of this queue that stopped heartbeating and whose steps are not recovered yet. Called every
        second by every worker, it asks Redis only once a worker may be dead: heartbeats only move forward, so
        none is before the oldest heartbeat seen (at this worker's last heartbeat or check) plus a lease, by
        the server's clock, with a second's slack for drift."""
        if self._server_offset_ms is not None and self._first_death_ms is not None:
            server_now = int(time.time() * 1000) + self._server_offset_ms + 1000
            if server_now < self._first_death_ms:
                return []
        dead, oldest, now = await self._dead(keys=[keys.workers_key(self.queue_name)],
                                             args=[self.lease_ms, keys.WORKER_PREFIX])
        self._first_death_ms = int(float(oldest)) + self.lease_ms
        self._server_offset_ms = int(now) - int(time.time() * 1000)
        return [_s(d) for d in dead]

    async def release(self, job_ids: Iterable[str], worker_id: str | None = None) -> None:
        ids = list(job_ids)
        if ids:
            await self.redis.hdel(keys.worker_steps_key(worker_id or self.worker_id), *ids)

    async def steps_of(self, worker_id: str) -> dict[str, Job | None]:
        """A worker's listed steps: arq job id -> job (None where the entry does not decode)."""
        raw = await self.redis.hgetall(keys.worker_steps_key(worker_id))
        out: dict[str, Job | None] = {}
        for jid, data in raw.items():
            try:
                out[_s(jid)] = Job.from_dict(json.loads(_s(data)))
            except ValueError:
                out[_s(jid)] = None
        return out

    async def forget(self, worker_id: str, recovered: Iterable[str] = ()) -> bool:
        """Drop the listings of a dead worker's recovered steps, and the worker itself once it is gone and lists
        nothing more. Returns whether the worker was dropped."""
        return bool(await self._forget(
            keys=[keys.worker_key(worker_id), keys.worker_steps_key(worker_id), keys.workers_key(self.queue_name)],
            args=[worker_id, *recovered]))

    async def unregister(self) -> None:
        """A clean stop: this worker is gone now, not in ``lease_s``. Steps it still lists (a hand-back whose
        release failed) stay listed, so the next heartbeat of another worker recovers them."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.worker_key(self.worker_id))
            pipe.hdel(keys.workers_seen_key(self.queue_name), self.worker_id)
            await pipe.execute()
        await self.forget(self.worker_id)

    async def is_held(self, worker_id: str, job_id: str) -> bool:
        return bool(await self._held(keys=[keys.worker_key(worker_id), keys.worker_steps_key(worker_id)],
                                     args=[job_id]))

    async def workers(self) -> list[WorkerInfo]:
        """This queue's workers, live first, with their registry fields (a dead one: only its last beat)."""
        entries = await self.redis.zrange(keys.workers_key(self.queue_name), 0, -1, withscores=True)
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid, _ in entries:
                pipe.hgetall(keys.worker_key(_s(wid)))
            hashes = await pipe.execute()
        out = []
        for (wid, score), fields in zip(entries, hashes, strict=True):
            decoded = {_s(k): _loads(v) for k, v in fields.items()}
            out.append(WorkerInfo(_s(wid), bool(fields), int(score), decoded))
        out.sort(key=lambda w: (not w.alive, w.worker_id))
        return out

    async def fleet(self) -> tuple[int, list[WorkerInfo]]:
        """What `flowcraft workers` shows: (server time ms, this queue's live workers and the ones whose lease
        lapsed within the last lease, live first). A lost worker keeps the fields of its last heartbeat."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(keys.workers_key(self.queue_name), 0, -1, withscores=True)
            pipe.hgetall(keys.workers_seen_key(self.queue_name))
            (sec, usec), entries, seen_raw = await pipe.execute()
        now = int(sec) * 1000 + int(usec) // 1000
        beats: dict[str, int | None] = {_s(wid): int(score) for wid, score in entries}
        seen: dict[str, dict[str, Any]] = {}
        for wid, raw in seen_raw.items():
            entry = _loads(raw)
            if isinstance(entry, dict) and isinstance(entry.get("fields"), dict):
                seen[_s(wid)] = entry
                beats.setdefault(_s(wid), entry.get("heartbeat_at"))
        ids = sorted(beats)
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(keys.worker_key(wid))
            hashes = await pipe.execute()
        out = []
        for wid, fields in zip(ids, hashes, strict=True):
            if fields:
                decoded = {_s(k): _loads(v) for k, v in fields.items()}
                out.append(WorkerInfo(wid, True, decoded.get("heartbeat_at", beats[wid]), decoded))
                continue
            beat = beats[wid]
            # its key expired lease_ms after its last heartbeat; it is shown for one more lease
            if beat is not None and now - beat <= 2 * self.lease_ms:
                out.append(WorkerInfo(wid, False, beat, dict(seen.get(wid, {}).get("fields") or {})))
        out.sort(key=lambda w: (not w.alive, w.worker_id))
        return now, out

    async def server_time_ms(self) -> int:
        sec, usec = await self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000


def worker_fields(queue_name: str, blueprints: Mapping[str, str], concurrency: int, started_at: int,
                  running: int) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "queue": queue_name,
            "blueprints": dict(blueprints), "concurrency": concurrency, "started_at": started_at,
            "running": running}


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _loads(value: Any) -> Any:
    try:
        return json.loads(_s(value))
    except ValueError:
        return _s(value)
