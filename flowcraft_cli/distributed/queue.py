"""arq, behind the smallest interface the runtime needs, so it could be swapped (arq is in
maintenance mode and pins redis<6). Jobs travel as JSON — never pickle — on both sides."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.asyncio import ConnectionPool, Redis

from ..jobs import Job
from ..store import dumps, parse_json
from . import keys
from .commit import OP_DEL, OP_PICK, OP_UNQUEUE, OP_ZREM, Commit

log = logging.getLogger("flowcraft.queue")

STEP_FUNCTION = "flowcraft_step"

# How deep the queue is, in one round trip and without visiting every job. KEYS: [1] the queue's sorted set
# (arq scores each job by the time it may run, in ms); ARGV: [1] arq's in-progress key prefix, [2] how many
# of the oldest ready jobs to look at for in-progress ones. arq takes ready jobs oldest first, so the ones
# it runs are among the oldest: only those are checked, never the whole queue. Returns {server time ms,
# ready (in progress included), deferred, in progress, score of the oldest ready job not in progress or -1}.
_COUNTS = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ready = redis.call('ZCOUNT', KEYS[1], '-inf', now)
local deferred = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
local running, oldest = 0, -1
local head = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #head, 2 do
  if redis.call('EXISTS', ARGV[1] .. head[i]) == 1 then
    running = running + 1
  elseif oldest < 0 then
    oldest = tonumber(head[i + 1])
  end
end
return {now, ready, deferred, running, oldest}
"""


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """One reading of a queue: ``ready`` jobs wait for a worker now, ``deferred`` ones wait for their time
    (retry backoff, sleeps, version-gate bounces), ``in_progress`` ones run on a worker."""

    queue: str
    ready: int
    deferred: int
    in_progress: int
    oldest_ready_age_ms: int | None  # how long the oldest waiting job has been ready; None when none waits

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def serialize(data: Any) -> bytes:
    """arq's job framing as JSON (a fan-out's commit encodes one per branch): the store's codec."""
    return dumps(data).encode()


def deserialize(raw: bytes) -> Any:
    # arq reports a failure here as "deserializing job failed" and drops the job without running it
    return parse_json(raw)


def arq_pool_for(redis: Redis, queue_name: str) -> ArqRedis:
    """An ArqRedis on the same server as ``redis``. arq needs raw bytes, whatever the caller's client
    decodes, so it gets its own pool built from the same connection settings."""
    pool = redis.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    arq_pool = ConnectionPool(connection_class=pool.connection_class, **kwargs)
    return ArqRedis(arq_pool, job_serializer=serialize, job_deserializer=deserialize, default_queue_name=queue_name)


def _job_keys(job_id: str) -> list[str]:
    """arq's keys of one job that its end deletes: in-progress lock, retry counter, payload."""
    return [p + job_id for p in (in_progress_key_prefix, retry_key_prefix, job_key_prefix)]


class ArqQueue:
    def __init__(self, pool: ArqRedis, queue_name: str) -> None:
        self.pool = pool
        self.queue_name = queue_name

    async def enqueue(self, jobs: Iterable[Job]) -> list[str]:
        """Queue each job under its deterministic id; an id already queued or running is a no-op.
        Returns the ids really added."""
        added: list[str] = []
        ready = 0
        now_ms = datetime.now(UTC).timestamp() * 1000
        for job in jobs:
            defer = None
            if job.not_before_ms > 0:
                defer = datetime.fromtimestamp(job.not_before_ms / 1000, UTC)
            got = await self.pool.enqueue_job(STEP_FUNCTION, job.to_dict(), _job_id=job.job_id,
                                              _queue_name=self.queue_name, _defer_until=defer)
            if got is not None:
                added.append(job.job_id)
                ready += job.not_before_ms <= now_ms
        if added:
            await self.wake(max(1, ready))  # a deferred job wakes one worker too: it learns when the job is due
        return added

    def job_record(self, job: Job, now_ms: int, seed: dict[str, dict[str, str | None]] | None = None,
                   reread: list[list[str]] | None = None) -> tuple[str, int, bytes, int]:
        """What arq's ``enqueue_job`` would write for ``job``, for a commit that queues it itself (atomically
        with the decision): (job key, score, payload, expiry ms). arq's own serializer framing and key
        names, so arq's worker runs it as if ``enqueue_job`` had queued it. ``seed``: the run's fields its
        step reads first (kind -> field -> stored JSON, None for absent), a key of the payload beside arq's own:
        arq and workers of earlier releases ignore it (as an argument of the step, they would reject the job),
        and a worker that takes the job in a commit reads it (``ArqAdapter._run_picked``). ``reread``: fields
        ([hash key, field, kind, field of the kind]) whose current values the commit that takes the job sends
        back with it (``commit.OP_PICK``): the node's record and input, as they are when the job is taken."""
        score = max(now_ms, job.not_before_ms)
        extra = {**({"seed": seed} if seed else {}), **({"reread": reread} if reread else {})}
        payload = serialize_job(STEP_FUNCTION, (job.to_dict(),), {}, None, now_ms,
                                serializer=(lambda data: serialize({**data, **extra})) if extra else serialize)
        return job_key_prefix + job.job_id, score, payload, score - now_ms + expires_extra_ms

    async def finish(self, job_id: str) -> None:
        """A job this worker took itself (in a commit) is done: what arq's ``finish_job`` does, with no result
        kept. (arq's abort set is left alone: flowcraft never aborts an arq job, a cancel is its own.)"""
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.delete(*_job_keys(job_id))
            pipe.zrem(self.queue_name, job_id)
            await pipe.execute()

    def finish_ops(self, program: Commit, job_id: str) -> None:
        """``finish``, as ops of a commit (the job's last step): no round trip of its own."""
        first, *more = _job_keys(job_id)
        program.op(OP_DEL, first, *(program.key(k) for k in more))
        program.op(OP_ZREM, self.queue_name, job_id)

    def unqueue_op(self, program: Commit, job_id: str) -> None:
        """A commit claimed the step of queued job ``job_id`` for its own worker: drop the job (when the job is
        another step's, the commit holds only if no worker has taken it: ``Txn.unheld``)."""
        program.op(OP_UNQUEUE, self.queue_name, job_id, job_key_prefix)

    @staticmethod
    def lock_key(job_id: str) -> str:
        """arq's lock on a job a worker runs (its in-progress key)."""
        return in_progress_key_prefix + job_id

    def pick_op(self, program: Commit, lock_ms: int, look: int) -> None:
        """Take one of the ``look`` oldest ready jobs nobody holds for the committing worker, locked
        ``lock_ms`` as arq locks the jobs it runs (``commit.picked`` reads it from the reply)."""
        program.op(OP_PICK, self.queue_name, timestamp_ms(), in_progress_key_prefix, job_key_prefix, lock_ms, look,
                   random.randrange(look), retry_key_prefix)

    async def defer(self, job_id: str, seconds: float) -> None:
        """Put a job this worker took back for later (arq's ``Retry(defer=...)``): due in ``seconds``, and
        unlocked."""
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.zadd(self.queue_name, {job_id: timestamp_ms() + int(seconds * 1000)})
            pipe.delete(self.lock_key(job_id))
            await pipe.execute()

    async def wake(self, n: int = 1) -> None:
        """Wake up to ``n`` idle workers of this queue (each blocks on the wake list; see WakingWorker)."""
        key = keys.wake_key(self.queue_name)
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.lpush(key, *([b"1"] * min(n, WAKE_CAP)))
            pipe.ltrim(key, 0, WAKE_CAP - 1)
            pipe.expire(key, 86400)
            await pipe.execute()

    async def state_of(self, job_ids: list[str]) -> dict[str, str]:
        """'queued' or 'running' per job id still known to arq (absent ids are done or never queued)."""
        if not job_ids:
            return {}
        async with self.pool.pipeline(transaction=False) as pipe:
            for jid in job_ids:
                pipe.exists(job_key_prefix + jid)
                pipe.exists(self.lock_key(jid))
            flags = await pipe.execute()
        out = {}
        for i, jid in enumerate(job_ids):
            if flags[2 * i + 1]:
                out[jid] = "running"
            elif flags[2 * i]:
                out[jid] = "queued"
        return out

    async def discard(self, job_ids: list[str]) -> None:
        """Forget jobs a dead worker held, once their step is recovered under a new job id (or is queued again
        under the same one): arq would otherwise hand each one on when its lock lapses, only for it to be
        dropped as stale."""
        if not job_ids:
            return
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.zrem(self.queue_name, *job_ids)
            pipe.delete(*(p + jid for jid in job_ids
                          for p in (job_key_prefix, in_progress_key_prefix, retry_key_prefix)))
            await pipe.execute()

    async def renew(self, job_ids: Iterable[str], lease_ms: int) -> None:
        """Keep arq's lock on the jobs this worker runs for another lease. arq's lock then lapses ``lease_ms``
        after a worker dies, and arq hands the job to another worker by itself: the backstop for every moment
        a step is not (or no longer) in the worker's list of steps."""
        ids = list(job_ids)
        if not ids:
            return
        async with self.pool.pipeline(transaction=False) as pipe:
            for jid in ids:
                pipe.pexpire(self.lock_key(jid), lease_ms)
            await pipe.execute()

    async def counts(self, *, head: int = 10_000) -> QueueCounts:
        """Jobs ready, deferred and in progress, and the oldest ready job's age (Redis server clock). Two
        ZCOUNTs and a look at the ``head`` oldest ready jobs, whatever the queue's length."""
        now, ready, deferred, running, oldest = await self.pool.eval(
            _COUNTS, 1, self.queue_name, in_progress_key_prefix, str(head))
        now, oldest = int(now), int(oldest)
        return QueueCounts(self.queue_name, int(ready) - int(running), int(deferred), int(running),
                           max(0, now - oldest) if oldest >= 0 else None)

    async def close(self) -> None:
        await self.pool.aclose()


# Wake tokens pushed at most at once: enough to wake every idle worker of a big fleet, few enough that a burst
# of enqueues never grows the list (a commit trims it back to this when it holds twice as many).
WAKE_CAP = 64


# Lock up to ARGV[4] of the ready jobs ARGV[5..] that nobody holds, as arq's start_jobs does one at a time
# with a WATCH/EXISTS/ZSCORE/MULTI round each: a job is taken when nobody holds it (one MGET of the
# in-progress keys: the oldest ready jobs are mostly running already, arq keeps them queued until they
# end), it is still in the queue and due (score <= ARGV[1]), and its in-progress key (ARGV[2] .. id, ARGV[3]
# ms) is set now (SET NX: the lock every picker respects). Returns id, score, ... of the jobs taken.
_LOCK_READY = """
local out, want = {}, tonumber(ARGV[4])
local s = 5
while s <= #ARGV and #out < 2 * want do
  local e = math.min(#ARGV, s + 499)
  local locks = {}
  for j = s, e do locks[#locks + 1] = ARGV[2] .. ARGV[j] end
  locks = redis.call('MGET', unpack(locks))
  for j = s, e do
    local id = ARGV[j]
    if not locks[j - s + 1] then
      local score = redis.call('ZSCORE', KEYS[1], id)
      if score and tonumber(score) <= tonumber(ARGV[1])
          and redis.call('SET', ARGV[2] .. id, '1', 'NX', 'PX', ARGV[3]) then
        out[#out + 1] = id
        out[#out + 1] = score
        if #out >= 2 * want then break end
      end
    end
  end
  s = e + 1
end
return out
"""


# Drop the wake tokens when no job is ready (KEYS: the queue, its wake list; ARGV: now ms): one step on the
# server, so that a token pushed for a job queued after the look is never dropped with the stale ones.
# Returns -1 when a job is ready (nothing dropped).
_DROP_STALE_WAKES = """
if redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[1]) > 0 then return -1 end
return redis.call('DEL', KEYS[2])
"""


class WakingWorker(Worker):
    """arq's Worker, woken instead of polling (arq polls its queue every ``poll_delay``; a chain of steps then
    waits one poll per hop, and an idle worker asks Redis 50 times a second).

    After each look at the queue an idle worker blocks on ``flowcraft:wake:<queue>`` (BLPOP), which every
    enqueue of a ready job pushes to, until a job is queued, the next deferred job (a retry backoff, a sleep)
    is due, or ``idle_s`` passes, whichever comes first. Jobs arq makes ready by itself (a dead worker's job
    whose lock lapsed, a job put back with a delay while this worker waited) are picked up within ``idle_s``.
    Burst mode keeps arq's polling: it must notice an empty queue at once."""

    def __init__(self, *args: Any, idle_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_s = idle_s
        self._wake_key = keys.wake_key(self.queue_name)
        self._next_due: int | None = None  # when the next deferred job is due (ms), as last asked
        self._stale_deferred = True
        self._done_seen = (0, 0, 0)
        self._lock_ready = self.pool.register_script(_LOCK_READY)
        self._drop_stale_wakes = self.pool.register_script(_DROP_STALE_WAKES)
        self._woken = False  # the last wait ended on a wake-up token
        self._saw_none = False  # the last look at the queue found no ready job at all
        self._filled = False  # the last look at the queue filled every free slot: more may be ready

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs``, with every id's check and lock in one call instead of four round trips each:
        a fan-out's first jobs then start on every free slot at once, not one slot after another (a wave of
        work late on the last slot)."""
        self._saw_none = not job_ids
        self._filled = False
        free = self.max_jobs - self.job_counter
        if free <= 0 or not job_ids:
            return
        # (a reply lost after the script ran leaves its locks unrenewed: those jobs wait one lock, a lease,
        # as one would after arq's own pickup died between its lock and its task; they are not lost)
        taken = await self._lock_ready(keys=[self.queue_name], args=[
            timestamp_ms(), in_progress_key_prefix, int(self.in_progress_timeout_s * 1000), free, *job_ids])
        self._filled = len(taken) // 2 >= free
        for job_id, score in zip(taken[::2], taken[1::2], strict=True):
            await self.sem.acquire()  # a free slot: at most ``free`` were taken (arq's semaphore, arq's counter)
            self.job_counter += 1
            job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def finish_job(self, job_id: str, finish: bool, result_data: bytes | None,
                         result_timeout_s: float | None, keep_result_forever: bool, incr_score: int | None,
                         keep_in_progress: float | None) -> None:
        """arq's ``finish_job``, except that a job handed back for later (``Retry``) is moved in the queue only
        if it is still there: a commit may have taken it out (its step done, the slot gone on with the next
        one; or its step claimed by another worker's commit), and arq's ZINCRBY would queue its id again, due
        at once with no job behind it ("job expired")."""
        if finish or not incr_score:
            await super().finish_job(job_id, finish, result_data, result_timeout_s, keep_result_forever,
                                     incr_score, keep_in_progress)
            return
        async with self.pool.pipeline(transaction=True) as tr:
            if keep_in_progress is None:
                tr.delete(ArqQueue.lock_key(job_id))
            else:
                tr.pexpire(ArqQueue.lock_key(job_id), int(keep_in_progress * 1000))
            tr.zadd(self.queue_name, {job_id: incr_score}, xx=True, incr=True)
            await tr.execute()

    async def _poll_iteration(self) -> None:
        await super()._poll_iteration()
        if self.burst:
            return
        if self.allow_pick_jobs:
            await self._wait_for_work()
        else:
            await self._wait_for_a_slot()  # draining: nothing to pick, wait for the steps still running

    async def _wait_for_a_slot(self) -> None:
        # arq's loop would otherwise come straight back (no poll delay here) and spin
        running = [t for t in self.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=self.idle_s, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(min(self.idle_s, 0.05))

    async def _wait_for_work(self) -> None:
        if self.job_counter >= self.max_jobs:
            await self._wait_for_a_slot()  # every slot is busy
            return
        if self._filled:
            # the last look filled every free slot, and they are free again already (quick steps): more jobs may
            # be ready than the wake-up tokens announce (a batch queues thousands, and pushes WAKE_CAP): look again
            self._filled = False
            return
        if self._woken and self._saw_none:
            # Woken, and the queue had nothing ready: the tokens left announce jobs already taken (a fan-out
            # pushes up to WAKE_CAP for a fleet; its branches then ran inline), and each would cost a look at
            # the queue. Dropped at once if still nothing is ready (checked in the same step on the server, so
            # a job queued since keeps its token for whichever worker is free); else look again
            self._woken = False
            if await self._drop_stale_wakes(keys=[self.queue_name, self._wake_key], args=[timestamp_ms()]) == -1:
                return

        now = timestamp_ms()
        # When is the next deferred job due? Asked again only when something may have changed it: a wake-up
        # (every enqueue pushes one, deferred jobs included), a job of this worker ended (arq defers a retried
        # one itself), or the one known fell due. An idle worker then sends one BLPOP and arq's one poll a turn.
        done = (self.jobs_complete, self.jobs_retried, self.jobs_failed)
        if self._stale_deferred or done != self._done_seen or (self._next_due is not None and now >= self._next_due):
            nxt = await self.pool.zrangebyscore(self.queue_name, min=f"({now}", max=float("inf"), start=0, num=1,
                                                withscores=True)
            self._next_due = int(nxt[0][1]) if nxt else None
            self._stale_deferred, self._done_seen = False, done
        timeout = self.idle_s if self._next_due is None else min(self.idle_s, max(0.0, (self._next_due - now) / 1000))
        if timeout >= 0.01:
            # Redis >= 6 takes a fractional timeout; redis-py's stubs say int
            self._woken = await self.pool.blpop([self._wake_key], timeout=timeout) is not None  # type: ignore[arg-type]
            if self._woken:
                self._stale_deferred = True
