"""RedisStore: the engine's Store on Redis. A transaction reads what it needs (from this process's cache of
the run's fields where it can, else from Redis), decides, and commits in one call of ``commit.APPLY`` that
checks every field it read still holds what it saw and then applies every write, the jobs it decided
included (queued on arq in the same atomic call). Two workers finishing predecessors of the same join thus
serialize: the second one's commit is refused and decided again on the first one's writes."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from redis.asyncio import Redis

from ..engine.state import DEFER_FIELDS, META_FIELDS, NodeRecord, RunMeta
from ..errors import UndecodableValue
from ..jobs import Job
from ..store import (
    BATCH,
    JOINS,
    KINDS,
    MISSING,
    NODES,
    OUTBOX,
    RUN,
    STATE,
    Store,
    Txn,
    dumpb,
    dumps,
    encode_once,
    load_field,
    parse_json,
)
from . import keys
from .commit import (
    APPLY,
    OP_DEFINE,
    OP_DEL,
    OP_ENQUEUE,
    OP_EXPIRE,
    OP_EXPIRE_ANY,
    OP_EXPIRE_NEW,
    OP_EXTEND,
    OP_EXTEND_INDEX,
    OP_HDEL,
    OP_HSET,
    OP_SET_PX,
    OP_TRIM_INDEX,
    OP_WAKE,
    OP_ZADD,
    OP_ZREM,
    Commit,
    picked,
)
from .queue import WAKE_CAP, ArqQueue
from .scripting import HeldConnections

T = TypeVar("T")
EVENT_CAP = 10_000
PICK_LOOK = 32  # ready jobs a commit looks at for one to take (the first few may be running elsewhere)
TRIM_BATCH = 1000  # due index entries looked at per trim (at most one a second per process)


def _resets_expiry(txn: Txn) -> bool:
    """Does this transaction set the expiry of everything its run touches (the run's keys, its blueprint's
    definition, its queue's index)? At the run's start and end, a retry, and a sleep that asks for longer;
    other transactions only refresh it now and then (``RedisStore._due``)."""
    return txn.final is not None or txn.unfinal or txn.started is not None or txn.ttl_s is not None


def _raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _with_event_count(wanted: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """``wanted`` fields of a run, with its count of events when the meta is among them: a step that reads the
    meta (every step) numbers its events from that count, so whatever brings a step's meta into this
    process's memory ahead of it (a start job's values, a commit's warm fields, a preload) brings it too."""
    return {**wanted, RUN: [*wanted[RUN], keys.EVENT_COUNT]} if RUN in wanted else dict(wanted)


# Kinds whose hash a transaction may empty (and so delete) and a later one create again, without an expiry:
# a write to one gets an expiry if it has none. The others (the run's hash of meta, node records and joins,
# and the context) exist from the run's start to its end and keep the expiry given at start and refreshed
# by ``_due``.
_RECREATED = frozenset({BATCH, OUTBOX})
_RUN_CACHE_CAP = 2_000  # runs whose fields this process remembers (least recently used forgotten first)
_VALUE_CACHE_CAP = 64 * 1024  # bytes: a bigger value (a large node output) is read from Redis each time
_SEED_VALUE_CAP = 8 * 1024  # bytes: a bigger value is not sent with a start job (``Txn.seeds``)


class _RunFields(dict[tuple[str, str], bytes | None]):
    """What this process remembers of one run's fields: (kind, field) -> the bytes last seen or written, None
    for absent. Large values are not kept, so that 2,000 runs remembered cannot hold gigabytes of outputs."""

    def __setitem__(self, key: tuple[str, str], raw: bytes | None) -> None:
        if raw is not None and len(raw) > _VALUE_CACHE_CAP:
            self.pop(key, None)
        else:
            super().__setitem__(key, raw)


class _RedisTxn(Txn):
    """Reads come from the store's cache of the run's fields, else from Redis (one HMGET per call, or one
    pipeline for a ``prefetch``). Every value read is remembered with the bytes seen: the commit checks
    them all (``commit.APPLY``), so a stale cache costs a retry, never a wrong decision."""

    def __init__(self, store: RedisStore, run_id: str) -> None:
        super().__init__(run_id)
        self._store = store
        self._fields = store._fields_of(run_id)
        self.reads: dict[tuple[str, str], bytes | None] = {}
        self.cached = False  # some value read came from the cache, not from Redis during this transaction
        self.encoded: dict[tuple[str, str], bytes] = {}  # each value written, as JSON bytes (``_writes``)

    async def _load(self, kind: str, fields: list[str]) -> list[str | bytes | None]:
        reads, remembered = self.reads, self._fields
        wanted = [(kind, f) for f in fields]
        misses = [key for key in wanted if key not in reads and key not in remembered]
        if misses:
            got = await self._store.redis.hmget(keys.kind_key(kind, self.run_id),
                                                keys.field_names(kind, [f for _, f in misses]))
            for key, raw in zip(misses, got, strict=True):
                remembered[key] = reads[key] = None if raw is None else _raw(raw)
        out: list[str | bytes | None] = []
        for key in wanted:
            if key in reads:
                out.append(reads[key])
            else:
                raw = reads[key] = remembered[key]
                self.cached = True
                out.append(raw)
        return out

    async def prefetch(self, wanted: dict[str, list[str]]) -> None:
        fetched = await self._store._fetch(self.run_id, wanted, skip=self.reads)
        self.reads.update(fetched)

    def assume_absent(self, wanted: dict[str, list[str]]) -> None:
        for kind, fields in wanted.items():
            for f in fields:
                if (kind, f) not in self.reads:
                    self._fields.setdefault((kind, f), None)


class RedisStore(Store):
    """``queue_name``: the queue whose run index (``keys.run_index_keys``) a run's start and status changes are
    written to; without one, no index is kept. ``queue``: the arq queue a commit puts the jobs it decides
    on, in the same atomic call (then nothing waits in the run's outbox, and the driver queues nothing)."""

    def __init__(self, redis: Redis, *, running_ttl_s: int = 7 * 86400, queue_name: str | None = None,
                 queue: ArqQueue | None = None) -> None:
        self.redis = redis
        self.running_ttl_s = running_ttl_s
        self.queue_name = queue_name
        self.queue = queue
        self.enqueues = queue is not None
        self.conflicts = 0  # transactions decided again because a field they read had changed
        self._kept: dict[str, float] = {}  # key -> when this process last extended its expiry (monotonic s)
        # what the program being built marked done in _kept, with the time it replaced: undone if refused
        self._marks: list[tuple[str, float | None]] = []
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # run id -> (lock, callers holding or waiting)
        # run id -> (kind, field) -> the bytes last seen or written by this process (None: absent)
        self._cache: OrderedDict[str, _RunFields] = OrderedDict()
        self._held = HeldConnections(redis)  # the step path's round trips (see scripting)
        script = redis.register_script(APPLY)

        async def apply(keys: list[Any], args: list[Any]) -> Any:
            return await self._held.script(script, keys, args)

        self._apply = apply  # (a test wraps it to lose a reply)
        self._nonempty: dict[str, set[str]] = {}  # run id -> kinds of _RECREATED this process knows hold a field
        self._warmed: dict[str, set[str]] = {}  # run id -> Txn.warm_once tags already fetched into the cache

    async def close(self) -> None:
        """Close the connections the step path holds (the client's pool is its owner's to close)."""
        await self._held.close()

    def _fields_of(self, run_id: str) -> _RunFields:
        got = self._cache.get(run_id)
        if got is None:
            got = self._cache[run_id] = _RunFields()
            while len(self._cache) > _RUN_CACHE_CAP:
                gone = self._cache.popitem(last=False)[0]
                self._nonempty.pop(gone, None)
                self._warmed.pop(gone, None)
        else:
            self._cache.move_to_end(run_id)
        return got

    def forget(self, run_id: str) -> None:
        """Drop what this process remembers of a run (a finished run is rarely touched again)."""
        self._cache.pop(run_id, None)
        self._nonempty.pop(run_id, None)
        self._warmed.pop(run_id, None)

    async def transact(self, run_id: str, fn: Callable[[Txn], Awaitable[T]]) -> T:
        # Steps of one run inside this process take turns: each then decides on what the one before it
        # committed (this process's cache), and only races with other processes cost a second decision.
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
        tries = stole = 0
        while True:
            txn = _RedisTxn(self, run_id)
            txn.steal_refusals = stole
            try:
                result = await fn(txn)
            except Exception:
                # a decision to refuse (StateConflict, "already exists") taken on cached values must hold too:
                # check what it read, and decide again on fresh values if any of it was stale
                if not txn.cached:
                    raise
                program = Commit()
                self._checks(program, txn)
                reply = await self._apply(program.keys, program.argv())
                if int(reply[0]) == 1:
                    raise
                self._absorb(run_id, program, reply)
                continue
            if not txn.dirty and not txn.cached:
                return result  # read only, and every read was Redis's own answer
            program = Commit()
            if txn.dirty:
                # what the definition and the index writes need (cached already: every step reads the meta)
                try:
                    meta = await txn.get_many(RUN, ("blueprint_id", "blueprint_version", "created_at", "queue"))
                except UndecodableValue:
                    meta = {}
            if txn.started is not None and self.queue_name is not None:
                txn.put(RUN, "queue", self.queue_name)  # whose reconciler may judge it (another project's may not)
            if txn.events:
                await self._number_events(txn)
            self._checks(program, txn)
            # building a program is synchronous: no other transaction marks anything in between
            marks: list[tuple[str, float | None]] = []
            self._marks = marks
            if txn.dirty:
                self._writes(program, txn, meta)
                self._catalog_writes(program, txn, meta)
                warm = {kind: list(fields) for kind, fields in _with_event_count(txn.warm).items()}
                warmed = self._warmed.setdefault(run_id, set())
                for tag, wanted in txn.warm_once.items():
                    if tag not in warmed:
                        for kind, fields in wanted.items():
                            warm.setdefault(kind, []).extend(fields)
                cache = self._fields_of(run_id)
                for kind, fields in warm.items():
                    program.warm(keys.kind_key(kind, run_id),
                                 keys.field_names(kind, [f for f in fields if (kind, f) not in cache]))
                if self.queue is not None:  # the queue work this commit does for its worker
                    for job_id in txn.unqueue:
                        self.queue.unqueue_op(program, job_id)
                    for job_id in txn.unheld:
                        program.absent(self.queue.lock_key(job_id))
                    if txn.finish_job:
                        self.queue.finish_ops(program, txn.finish_job)
                    if txn.pick_ms:
                        self.queue.pick_op(program, txn.pick_ms, PICK_LOOK)
            try:
                reply = await self._apply(program.keys, program.argv())
            except BaseException:
                self._undo(marks)
                raise
            if int(reply[0]) == 1:
                txn.picked = picked(reply)
                if txn.dirty:
                    self._remember(txn)
                    if self.on_commit is not None:
                        self.on_commit(txn)
                if (txn.warm or txn.warm_once) and txn.final is None and txn.dirty:
                    self._warmed.setdefault(run_id, set()).update(txn.warm_once)
                    self._absorb(run_id, program, reply)
                return result
            self._undo(marks)
            self.conflicts += 1
            self._absorb(run_id, program, reply)
            if txn.unheld:
                # it claimed a queued sibling, which another worker had taken meanwhile (held, or done: this
                # process's memory of it was stale): decided again at once; after two such, it claims none
                # (RunTxn.steal_queued), rather than try every sibling another worker took, a round trip each
                stole += 1
                continue
            # a field read changed (another process committed a step of this run): decide again on the values
            # the refused commit sent back, after a short random pause once it keeps happening, so that a crowd
            # of siblings finishing together on several workers (a wide fan-in) spreads out
            tries += 1
            if tries > 2:
                await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * tries)))

    async def _number_events(self, txn: _RedisTxn) -> None:
        """A run's events are fields of its hash, numbered from the count the run holds: read (so checked by
        the commit: two steps that add events at once serialize) and written with them. The last EVENT_CAP
        are kept. A count that is not a number (corrupt) is taken up again from the last event there is."""
        if txn.started is not None:  # a new run has none (the commit checks it)
            txn.assume_absent({RUN: [keys.EVENT_COUNT]})
        try:
            count = await txn.get(RUN, keys.EVENT_COUNT, 0)
        except UndecodableValue:
            count = None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            numbers = await self._hash_of_kind(keys.EVENTS, txn.run_id)
            count = max((int(n) for n in numbers if n.isdigit()), default=0)
        for n, event in enumerate(txn.events, count + 1):
            txn.put(keys.EVENTS, str(n), event)
            if n > EVENT_CAP:
                txn.delete(keys.EVENTS, str(n - EVENT_CAP))
        txn.put(RUN, keys.EVENT_COUNT, count + len(txn.events))

    def _undo(self, marks: list[tuple[str, float | None]]) -> None:
        """A program that was not applied did not do what it marked done in ``_kept``: it is still due."""
        for key, before in reversed(marks):
            if before is None:
                self._kept.pop(key, None)
            else:
                self._kept[key] = before

    def _absorb(self, run_id: str, program: Commit, reply: list[Any]) -> _RunFields:
        """Remember the field values a reply carries (current values of a refused commit's reads, or the warm
        fields of an applied one)."""
        cache = self._fields_of(run_id)
        run_key = keys.kind_key(RUN, run_id)
        kinds = {keys.kind_key(kind, run_id): kind for kind in KINDS}
        for key, fld, raw in program.values(reply):
            cache[keys.run_hash_field(fld) if key == run_key else (kinds[key], fld)] = raw
        return cache

    def _checks(self, program: Commit, txn: _RedisTxn) -> None:
        run_id = txn.run_id
        by_kind: dict[str, list[tuple[str, bytes | None]]] = {}
        for (kind, fld), raw in txn.reads.items():
            by_kind.setdefault(kind, []).append((fld, raw))
        for kind, checks in by_kind.items():
            prefix = keys.FIELD_PREFIX.get(kind)
            program.check_all(keys.kind_key(kind, run_id),
                              checks if prefix is None else [(prefix + f, raw) for f, raw in checks])

    def _remember(self, txn: _RedisTxn) -> None:
        """After a commit: the values written are what Redis holds now."""
        if txn.final is not None:
            self.forget(txn.run_id)
            return
        cache = self._fields_of(txn.run_id)
        # hashes this commit left with a field in them keep their expiry: later writes need not look at it
        # (see _RECREATED); one it deleted from may be empty, so gone, and created again without one
        known = self._nonempty.setdefault(txn.run_id, set())
        known |= {kind for kind, _ in txn._writes if kind in _RECREATED}
        known -= {kind for (kind, _), value in txn._writes.items() if value is MISSING}
        for (kind, fld), value in txn._writes.items():
            if kind == keys.EVENTS or (kind == OUTBOX and self.enqueues):
                continue  # (events are never read by a step)
            cache[(kind, fld)] = None if value is MISSING else txn.encoded.get((kind, fld)) or dumpb(value)

    def _writes(self, program: Commit, txn: Txn, meta: dict[str, Any]) -> None:
        run_id = txn.run_id
        ttl = self._ttl_of(txn)
        ms = ttl * 1000 if ttl and ttl > 0 else 0
        now = int(time.time() * 1000)
        sets: dict[str, list[str | bytes]] = {}
        dels: dict[str, list[str]] = {}
        jobs: list[Job] = []
        reads = txn.reads if isinstance(txn, _RedisTxn) else {}
        texts: dict[int, bytes] = {}  # (store.encode_once)
        for (kind, fld), value in txn._writes.items():
            if kind == OUTBOX and self.enqueues and value is not MISSING:
                jobs.append(txn.jobs.get(fld) or Job.from_dict(value))  # (RunTxn.schedule keeps the Job)
            elif value is MISSING:
                if reads.get((kind, fld), b"") is not None:  # absent as read (and checked): nothing to delete
                    dels.setdefault(kind, []).append(keys.field_name(kind, fld))
            else:
                encoded = encode_once(kind, value, texts, dumpb)
                if isinstance(txn, _RedisTxn):
                    txn.encoded[(kind, fld)] = encoded  # what _remember keeps after the commit
                if reads.get((kind, fld)) != encoded:  # the value read (and checked) is this one: no write
                    sets.setdefault(kind, []).extend((keys.field_name(kind, fld), encoded))
        # one HSET (and one HDEL) a hash: the meta, node records and joins share the run's
        for op, changes in ((OP_HSET, sets), (OP_HDEL, dels)):
            by_key: dict[str, list[str | bytes]] = {}
            for kind, args in changes.items():
                by_key.setdefault(keys.kind_key(kind, run_id), []).extend(args)
            for key, args in by_key.items():
                program.op(op, key, *args)
        if jobs:
            self._enqueue(program, txn, jobs, now)
        # the progress key's idle time is what the reconciler reads ("time since progress"): written by every
        # step but the run's start (until a step writes it, the reconciler counts from the run's created_at),
        # by this process at most once a second per run (a chain does a step a millisecond), and always with
        # the expiry the run's keys get now; deleted at the run's end (a finished run makes no progress)
        resets = _resets_expiry(txn)
        created = meta.get("created_at")
        progress = keys.progress_key(run_id)
        progressed = txn.final is not None or (
            txn.started is None and (resets or self._due_since_start(f"progress:{run_id}", 1.0, created)))
        if txn.final is not None:
            program.op(OP_DEL, progress)
        elif progressed:
            program.op(OP_SET_PX, progress, now, ms)
        if txn.unfinal:
            program.op(OP_DEL, keys.status_key(run_id))
        if txn.final is not None:
            program.op(OP_SET_PX, keys.status_key(run_id), dumps(txn.final[0]), ms)
        # keys written above with the expiry they need: no PEXPIRE of their own
        expired = {progress} if progressed else set()
        if txn.final is not None or txn.unfinal:
            expired.add(keys.status_key(run_id))
        # Expiry: every key of the run gets the run's TTL when the run starts, ends, or asks for longer (a
        # sleep), and otherwise at most every min(60 s, TTL/4) per process, so that a key no step writes for a
        # while (the context during a long node) does not lapse alone; in between, only a hash this
        # transaction may have created again (see _RECREATED) is looked at.
        if txn.started is not None:  # a new run: its keys are those this transaction writes
            for key in sorted({keys.kind_key(kind, run_id) for kind in sets}):
                program.op(OP_EXPIRE, key, ms)
        elif resets or self._due_since_start(f"run:{run_id}", self._period(ms), created):
            # the hashes a run may never hold a field in (joins of a chain, a batch's items, an outbox when
            # commits queue their jobs) are looked at with one EXISTS first: most runs have none of them
            maybe = [keys.kind_key(kind, run_id) for kind in sorted(_RECREATED - sets.keys())]
            for key in keys.run_keys(run_id):
                if key not in expired and key not in maybe:
                    program.op(OP_EXPIRE, key, ms)
            if maybe:
                program.op(OP_EXPIRE_ANY, maybe[0], ms, *(program.key(k) for k in maybe[1:]))
        elif ms:
            known = self._nonempty.get(run_id, set())
            for kind in (sets.keys() & _RECREATED) - known:
                program.op(OP_EXPIRE_NEW, keys.kind_key(kind, run_id), ms)
        if txn.ancestors:  # a parent run's keys live at least as long as any of its live children (§6.1)
            for ancestor in txn.ancestors:
                for key in keys.run_keys(ancestor):
                    program.op(OP_EXTEND, key, ms)
        # a claim lists its step under its worker, a commit unlists it; a commit that claims a successor for its
        # worker hands its own entry over to it (unlisted, then listed under the same id: one write)
        listing = {(worker_id, job_id): job for worker_id, job_id, job in txn.listing}
        for (worker_id, job_id), job in listing.items():
            steps = keys.worker_steps_key(worker_id)
            if job is None:
                program.op(OP_HDEL, steps, job_id)
            else:
                # no expiry set here: the worker's heartbeat gives its steps list one, and the list is emptied
                # (so deleted) as its steps end, or by whoever recovers them when the worker dies
                program.op(OP_HSET, steps, job_id, dumps(job))

    def _enqueue(self, program: Commit, txn: Txn, jobs: list[Job], now: int) -> None:
        """The jobs this transaction decided, queued by the commit itself (see ``ArqQueue.job_record``)."""
        assert self.queue is not None
        queue_key = self.queue.queue_name
        ready = 0
        args: list[bytes | str | int] = []
        for job in jobs:
            wanted = txn.seeds.get(job.job_id)
            seed = self._seed_of(txn, _with_event_count(wanted)) if wanted else None
            # what a first delivery reads anew before it runs its node unclaimed (Step._defer_claim): read by
            # the commit that takes the job, so that it costs no round trip of its own
            reread = [[keys.kind_key(kind, job.run_id), keys.field_name(kind, f), kind, f]
                      for kind, fields in ((RUN, DEFER_FIELDS), (NODES, [job.node_id]), (STATE, wanted.get(STATE, [])))
                      for f in fields] if wanted else None
            job_key, score, payload, expires_ms = self.queue.job_record(job, now, seed, reread)
            args += [program.key(job_key), score, payload, expires_ms, job.job_id]
            ready += score <= now
        program.op(OP_ENQUEUE, queue_key, *args)
        # a deferred job wakes one worker too: it learns when the job is due (WakingWorker)
        program.op(OP_WAKE, keys.wake_key(queue_key), min(max(1, ready), WAKE_CAP), WAKE_CAP)

    def _seed_of(self, txn: Txn, wanted: dict[str, list[str]]) -> dict[str, dict[str, str | None]]:
        """The values of ``wanted`` fields as this transaction leaves them: written by it, read by it, or known
        to this process (a new run's fields it took to be absent). Fields it knows nothing of are left out."""
        cache = self._fields_of(txn.run_id)
        reads = txn.reads if isinstance(txn, _RedisTxn) else {}
        encoded = txn.encoded if isinstance(txn, _RedisTxn) else {}
        seed: dict[str, dict[str, str | None]] = {}
        for kind, fields in wanted.items():
            for fld in fields:
                key = (kind, fld)
                if key in txn._writes:
                    if txn._writes[key] is MISSING:
                        raw = None
                    elif key in encoded:
                        raw = encoded[key]
                    else:
                        continue
                elif key in reads:
                    raw = reads[key]
                elif key in cache:
                    raw = cache[key]
                else:
                    continue
                if raw is not None and len(raw) > _SEED_VALUE_CAP:
                    continue  # a large input is read by the worker, not copied into every start job
                seed.setdefault(kind, {})[fld] = None if raw is None else raw.decode()
        return seed

    def seed(self, run_id: str, seed: Any) -> None:
        """Values of a run's fields that came with a queue job (``Txn.seeds``), remembered as if read, unless
        this process knows the run already (what it knows is as new). Checked by the commit like any value
        remembered: one that changed since only makes the step decide again (a step whose run turns out to be
        of another blueprint is handled again on fresh values, ``Engine._handle``). A seed with anything in it
        that is not a stored value of its kind (planted, another version's) is ignored whole."""
        if run_id in self._cache or not isinstance(seed, dict) or set(seed) - {RUN, NODES, JOINS, STATE}:
            return
        values: dict[tuple[str, str], bytes | None] = {}
        meta: dict[str, Any] = {}
        try:
            for kind, fields in seed.items():
                for fld, raw in fields.items():
                    if not isinstance(fld, str) or not (raw is None or isinstance(raw, str)):
                        return
                    values[(kind, fld)] = None if raw is None else raw.encode()
                    decoded = None if raw is None else parse_json(raw)
                    if kind == RUN and decoded is not None:
                        meta[fld] = decoded
                    elif kind == NODES and decoded is not None:
                        NodeRecord.from_json(decoded)
            RunMeta.from_fields(meta)
        except (ValueError, TypeError, KeyError, AttributeError):
            return
        cache = self._fields_of(run_id)
        for key, raw in values.items():
            cache[key] = raw  # (_RunFields leaves out large values)

    def reread(self, run_id: str, spec: Any, values: list[bytes | None]) -> frozenset[tuple[str, str]]:
        """The values a commit read anew for a job it took (``commit.OP_PICK``, the job's ``reread``), taken as
        what Redis holds now: the (kind, field) pairs remembered. A spec that names anything but this run's
        meta, node records and context fields, as they are stored (planted, another version's), is ignored
        whole."""
        if not isinstance(spec, list) or len(spec) != len(values):
            return frozenset()
        pairs = []
        for item in spec:
            if not (isinstance(item, list) and len(item) == 4 and all(isinstance(x, str) for x in item)):
                return frozenset()
            key, fld, kind, name = item
            if kind not in (RUN, NODES, STATE) or key != keys.kind_key(kind, run_id) \
                    or fld != keys.field_name(kind, name):
                return frozenset()
            pairs.append((kind, name))
        cache = self._fields_of(run_id)
        for pair, raw in zip(pairs, values, strict=True):
            cache[pair] = raw
        return frozenset(pairs)

    def _ttl_of(self, txn: Txn) -> int | None:
        return txn.final[1] if txn.final is not None else self.running_ttl_s if txn.ttl_s is None else txn.ttl_s

    def _catalog_writes(self, program: Commit, txn: Txn, meta: dict[str, Any]) -> None:
        """The blueprint definition the run uses (recorded at its start, then kept at least as long as the
        run's own keys), and the queue's run index (at start, at the end, and on every status change)."""
        ttl = self._ttl_of(txn)
        ms = ttl * 1000 if ttl and ttl > 0 else 0
        if txn.started is not None:
            from .definitions import document_of

            # written by the first run of this version this process starts, then as often as _due extends it
            bp = txn.started
            key = keys.blueprint_key(bp.id, bp.version)
            if self._due(key, ms):
                program.op(OP_DEFINE, key, document_of(bp), ms)
        # keys shared by runs (the definition, the index) only ever grow their expiry: a run's end, which
        # shortens its own keys' to the TTL, extends them only when that outlasts the running TTL they got
        grows = txn.ttl_s is not None or txn.unfinal or (txn.final is not None and self._beyond_running(ms))
        if txn.started is None and meta.get("blueprint_id") and meta.get("blueprint_version"):
            key = keys.blueprint_key(meta["blueprint_id"], meta["blueprint_version"])
            if grows or self._due(key, ms):
                program.op(OP_EXTEND, key, ms)
        # the index of the queue the run was started on (a client configured for another queue may cancel it)
        queue = self.queue_name if txn.started is not None else meta.get("queue")
        if not isinstance(queue, str):
            return  # no index (a store without a queue, or a run that recorded none)
        index = keys.run_index_keys(queue)
        expiry = keys.runs_expiry_key(queue)
        status = txn._writes.get((RUN, "status"), MISSING)
        run_id = txn.run_id
        now = int(time.time() * 1000)
        created: int = meta["created_at"] if isinstance(meta.get("created_at"), int) else now
        added: list[str] = []  # index keys this transaction adds the run to
        if isinstance(status, str):
            group = keys.run_group(status)
            added.append(keys.runs_by_status_key(group, queue))
            # with the group's placeholder, so that the last run leaving a group does not delete it
            program.op(OP_ZADD, added[-1], created, run_id, "-inf", keys.GROUP_PLACEHOLDER)
            # a new run is in no group yet; a run that ends leaves the active one (a retry, the one it failed in)
            leaves = () if txn.started is not None else ("active",) if txn.final is not None else keys.RUN_GROUPS
            for other in leaves:
                if other != group:
                    program.op(OP_ZREM, keys.runs_by_status_key(other, queue), run_id)
        if txn.started is not None:
            added.append(expiry)
        if txn.started is not None or txn.final is not None:
            # (at the end, the index holds the run already: an entry is dropped only once its run is gone)
            program.op(OP_ZADD, expiry, now + ms if ms else "+inf", run_id)
            if self._due_every(f"trim:{queue}", 1.0):  # entries of expired runs, at most once a second here
                program.op(OP_TRIM_INDEX, expiry, now, keys.kind_key(RUN, ""), TRIM_BATCH,
                           *(program.key(k) for k in index))
        # last: a sorted set created above has no expiry yet; an index key lives as long as its longest-lived
        # run, so it only ever grows its expiry (or loses it, for a run kept forever): all of them when the run
        # asks for longer (a sleep, a retry, a TTL beyond the running one), else as often as _due says (so an
        # index key may lapse up to a minute before the last run in it); in between, a key this transaction
        # may have created gets one if it has none
        if grows or self._due(index[0], ms):
            for key in index:
                program.op(OP_EXTEND_INDEX, key, ms)
        elif ms:
            # an index key is never emptied (the expiry dates hold the run committing, and the trim keeps a run
            # whose keys exist; a group of runs holds its placeholder), so it is never created again but after
            # it expired. Every period this process extends the index keys that exist as far as
            # the running TTL (above), so one it saw to an expiry within a period has one still, and it looks at
            # each key it adds runs to once a period
            for key in added:
                if self._due_every(f"new:{key}", self._period(ms)):
                    program.op(OP_EXPIRE_NEW, key, ms)

    def _due_every(self, key: str, every_s: float) -> bool:
        """Has ``every_s`` passed since this process last did what ``key`` names (then: it is done now)?"""
        now = time.monotonic()
        if now - self._kept.get(key, -1e18) < every_s:
            return False
        if len(self._kept) > 10_000:
            self._kept.clear()  # bounded: forgetting only means doing it once more
        self._marks.append((key, self._kept.get(key)))
        self._kept[key] = now
        return True

    def _beyond_running(self, ms: int) -> bool:
        """Does an expiry of ``ms`` (0: none) outlast what a run's start and ``_due`` give shared keys (the
        running TTL, given up to one ``_period`` ago)?"""
        running = self.running_ttl_s * 1000 if self.running_ttl_s > 0 else 0
        return running > 0 and (ms <= 0 or ms > running - self._period(running) * 1000)

    def _due_since_start(self, key: str, every_s: float, created_at: Any) -> bool:
        """``_due_every`` for something a run's start did too (its keys' expiry, its progress stamp, its events'
        expiry): the first time this process asks about a run younger than ``every_s``, it counts as done at
        the run's start, so that a short run's first steps here do not do it again."""
        if key not in self._kept and isinstance(created_at, int):
            age_s = time.time() - created_at / 1000
            if 0 <= age_s < every_s:
                self._kept[key] = time.monotonic() - age_s
        return self._due_every(key, every_s)

    @staticmethod
    def _period(ttl_ms: int) -> float:
        return 60.0 if ttl_ms <= 0 else min(60.0, ttl_ms / 4000)

    def _due(self, key: str, ttl_ms: int) -> bool:
        """Is it time to extend ``key``'s expiry again? Keys every step would otherwise touch (a blueprint's
        definition, a queue's run index) are extended by this process at most every quarter of their TTL
        (and at most every minute): their TTL is days, a step is milliseconds."""
        return self._due_every(key, self._period(ttl_ms))

    async def read(self, run_id: str, kind: str, fields: list[str]) -> list[Any]:
        if not fields:
            return []
        values = await self.redis.hmget(keys.kind_key(kind, run_id), keys.field_names(kind, fields))
        return [MISSING if v is None else load_field(v, run_id, kind, f)
                for f, v in zip(fields, values, strict=True)]

    async def preload(self, run_id: str, wanted: dict[str, list[str]],
                      anew: dict[str, list[str]] | None = None) -> None:
        await self._fetch(run_id, _with_event_count(wanted), anew=anew)

    async def _fetch(self, run_id: str, wanted: dict[str, list[str]],
                     skip: Mapping[tuple[str, str], Any] | None = None, *,
                     anew: dict[str, list[str]] | None = None) -> dict[tuple[str, str], bytes | None]:
        """Read the wanted fields this process does not remember (nor ``skip`` holds), and those of ``anew``
        whatever it remembers, in one pipeline, into its memory of the run. Returns what was read."""
        cache = self._fields_of(run_id)
        skip = skip or {}
        todo: dict[str, list[str]] = {kind: list(fields) for kind, fields in (anew or {}).items()}
        for kind, fields in wanted.items():
            for f in fields:
                key = (kind, f)
                if key not in cache and key not in skip and f not in todo.get(kind, ()):
                    todo.setdefault(kind, []).append(f)
        if not todo:
            return {}
        by_key: dict[str, list[tuple[str, str]]] = {}  # one HMGET a hash (the run's holds three kinds)
        for kind, fields in todo.items():
            by_key.setdefault(keys.kind_key(kind, run_id), []).extend((kind, f) for f in fields)
        replies = await self._held.pipeline([("HMGET", key, *(keys.field_name(kind, f) for kind, f in names))
                                             for key, names in by_key.items()])
        fetched: dict[tuple[str, str], bytes | None] = {}
        for names, got in zip(by_key.values(), replies, strict=True):
            for at, raw in zip(names, got, strict=True):
                cache[at] = fetched[at] = None if raw is None else _raw(raw)
        return fetched

    async def peek(self, run_id: str, kind: str, fields: list[str]) -> list[Any]:
        cache = self._cache.get(run_id)
        if cache is None or any((kind, f) not in cache for f in fields):
            return await self.read(run_id, kind, fields)
        out = []
        for f in fields:
            raw = cache[(kind, f)]
            out.append(MISSING if raw is None else load_field(raw, run_id, kind, f))
        return out

    async def read_all(self, run_id: str, kind: str, *, lenient: bool = False) -> dict[str, Any]:
        raw = await self._hash_of_kind(kind, run_id)
        return {k: load_field(v, run_id, kind, k, lenient=lenient) for k, v in raw.items()}

    async def _hash_of_kind(self, kind: str, run_id: str) -> dict[str, Any]:
        """The fields of ``kind`` (by their names in the kind) read outside a transaction: of the run's hash,
        which holds up to EVENT_CAP events too, only the meta's (HMGET) or those of the kind's prefix (HSCAN),
        not the whole of it. Not one snapshot: a view reads what it shows in several commands anyway."""
        key = keys.kind_key(kind, run_id)
        if kind == RUN:
            return {f: v for f, v in zip(META_FIELDS, await self.redis.hmget(key, list(META_FIELDS)), strict=True)
                    if v is not None}
        prefix = keys.FIELD_PREFIX.get(kind)
        if prefix is None:
            return {_s(f): v for f, v in (await self.redis.hgetall(key)).items()}
        return {_s(f)[len(prefix):]: v async for f, v in self.redis.hscan_iter(key, match=prefix + "*", count=1000)}

    async def read_status(self, run_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(keys.status_key(run_id))
        return None if raw is None else json.loads(_s(raw))

    async def read_events(self, run_id: str) -> list[dict[str, Any]]:
        events = await self._hash_of_kind(keys.EVENTS, run_id)
        return [json.loads(_s(events[n])) for n in sorted(events, key=lambda n: int(n) if n.isdigit() else -1)]

    async def _ack(self, run_id: str, job_ids: list[str]) -> None:
        await self.redis.hdel(keys.kind_key(OUTBOX, run_id), *job_ids)


assert set(KINDS) <= set(keys._KIND_PREFIX)
assert not any(":" in f for f in META_FIELDS)  # so no meta field has a prefix of keys.FIELD_PREFIX
assert keys.EVENT_COUNT not in META_FIELDS
