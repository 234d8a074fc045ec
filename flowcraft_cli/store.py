"""The state a run keeps, behind one small transactional interface, and its in-memory implementation.

The engine never talks to Redis or dicts directly: it opens a transaction on one run, reads fields (in
one go where it knows them in advance: ``prefetch``), buffers writes, and the store applies them all at once
(Redis: one Lua call that first checks every value read, decided again on a conflict; memory: under a per-run
lock). So a crash leaves either all of a step or none of it, and the
in-process runtime and the workers share one engine.

A run's state is a few hashes of JSON values, named by *kind*:

  RUN     run meta: status, reason, blueprint_id, blueprint_version, pending, awaiting, timestamps
  NODES   node_id -> node record (status, seq, gen, attempt, timings, error)
  JOINS   "<target>|<gen>|<source>" -> arrival, "<target>|<gen>|#" -> [decided, taken]
  BATCH   "<node>|<seq>|..." -> batch item bookkeeping
          (every part of these names, and of job ids, is escaped by ``ids.field_name``: node ids may hold ``|``)
  OUTBOX  job_id -> job: written in the same transaction that decides the job, deleted once queued
  STATE   the run context (Flowcraft keys: _outputs.<node>, _inputs.<node>, blueprintId, ...)
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from .errors import UndecodableValue

if TYPE_CHECKING:
    from .blueprint import Blueprint
    from .jobs import Job, Picked

RUN, NODES, JOINS, BATCH, OUTBOX, STATE = "run", "nodes", "joins", "batch", "outbox", "state"
KINDS = (RUN, NODES, JOINS, BATCH, OUTBOX, STATE)
MISSING: Any = object()
T = TypeVar("T")


class Record:
    """A typed value (the engine's node records and join bookkeeping) that a transaction keeps as it is until
    its commit, which encodes it (``to_json``) once: a step that writes one node's record several times (fired,
    claimed, completed) pays for one encoding. A read of it within the transaction gets its JSON form."""

    __slots__ = ()

    def to_json(self) -> Any:
        raise NotImplementedError

    def plain(self) -> bool:
        """Is every value in it a plain scalar (nothing a reader could change, nothing that is not JSON)? A store
        in memory may then keep it as it is (MemoryStore)."""
        return False


# msgspec's JSON codec is 5-10x faster than the json module's on a record; encoding and decoding were the
# largest single cost of an in-process step and about a tenth of a worker's. It writes NaN and the infinities
# as null, as JavaScript's JSON.stringify (so Flowcraft) does: they are not JSON. What it refuses (keys that
# are not strings or numbers, lone surrogates) the json module decides, as before. It also takes types the
# json module refuses (dates, sets, bytes): no value from a user is stored without passing check_json first.
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def dumps(value: Any) -> str:
    """A value (a JSON value, or a ``Record``) as compact JSON. Values from users pass ``check_json`` first."""
    if isinstance(value, Record):  # (by its own to_json: msgspec would encode a dataclass field by field)
        value = value.to_json()
    try:
        return _ENCODER.encode(value).decode()
    except (TypeError, ValueError, OverflowError):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def dumpb(value: Any) -> bytes:
    """``dumps``, as UTF-8 bytes (what a store writes), without a round trip through str."""
    if isinstance(value, Record):
        value = value.to_json()
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError, OverflowError):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_once(kind: str, value: Any, done: dict[int, Any], encode: Callable[[Any], T]) -> T:
    """``encode(value)``, for a context value (STATE) once per container object in one commit (``done``: id ->
    its encoding, kept for the commit only, while every value written stays alive and unchanged): a fan-out's
    firing writes one output as the input of each of its branches. Nothing else is written twice."""
    if kind != STATE or (type(value) is not dict and type(value) is not list):
        return encode(value)
    got = done.get(id(value))
    if got is None:
        got = done[id(value)] = encode(value)
    return got  # type: ignore[no-any-return]


def check_json(value: Any) -> None:
    """Raise TypeError or ValueError unless ``value`` is made of JSON's types only (dict, list, str, int,
    float, bool, None): the json module's rules, stricter than msgspec's (which takes dates, sets, bytes)."""
    json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def loads(raw: str | bytes, *, lenient: bool = False, where: str = "a stored value") -> Any:
    """One stored value. One that is not JSON (corrupt, or planted) raises UndecodableValue naming
    ``where``, or with ``lenient`` (what a view shows) reads as the string ``<undecodable: N bytes>``."""
    got = _SCALARS.get(raw)
    if got is not None:
        return got[0]
    return _decode(raw, lenient, where)


def load_field(raw: str | bytes, run_id: str, kind: str, field: str, *, lenient: bool = False) -> Any:
    """``loads`` of one field of a run's hash, named in the error; the name is made up only for an error (a
    step reads dozens of fields)."""
    got = _SCALARS.get(raw)
    if got is not None:
        return got[0]
    return _decode(raw, lenient, lambda: f"run {run_id!r}: {kind} field {field!r}")


def _decode(raw: str | bytes, lenient: bool, where: str | Callable[[], str]) -> Any:
    try:
        value = parse_json(raw)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        size = len(raw if isinstance(raw, bytes) else raw.encode(errors="surrogatepass"))
        if lenient:
            return f"<undecodable: {size} bytes>"
        raise UndecodableValue(f"{where if isinstance(where, str) else where()}: {size} bytes that are not JSON") \
            from None
    if (value is None or isinstance(value, (str, int, float))) and len(raw) <= 64:
        # short immutable values (a run's status, its blueprint id, counters, timestamps) are read by every
        # step: decoded once. Lists and dicts are decoded each time (callers may change what they get)
        if len(_SCALARS) >= 4096:
            _SCALARS.clear()
        _SCALARS[raw] = (value,)
    return value


def parse_json(raw: str | bytes) -> Any:
    """JSON text to a value (msgspec, with the json module behind it); raises ValueError if it is not JSON."""
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError:
        # what the json module reads and msgspec does not (NaN, written before values were encoded with msgspec;
        # an escaped lone surrogate), or raises the error a caller expects (a JSONDecodeError, a UnicodeError)
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


_SCALARS: dict[str | bytes, tuple[Any]] = {}  # raw JSON -> (decoded,), for short scalars only (``loads``)


def _load_kept(raw: Any, run_id: str, kind: str, field: str, *, lenient: bool = False) -> Any:
    """``load_field`` of a value a MemoryStore keeps: JSON text, or a plain Record (copied by ``to_json``)."""
    if isinstance(raw, Record):
        return raw.to_json()
    return load_field(raw, run_id, kind, field, lenient=lenient)


_UNSEEN: Any = object()
_NO_FIELDS: dict[str, str] = {}


class Txn(ABC):
    """One transaction on one run. Reads see this transaction's own writes."""

    # does reading fields in one go ahead of their use save anything (``prefetch``: a round trip a field)? Not
    # where every read is a dict lookup (the memory store): there a prefetch only decodes what may go unread
    reads_ahead = True

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._writes: dict[tuple[str, str], Any] = {}  # value or MISSING (delete)
        self._cache: dict[tuple[str, str], Any] = {}
        self.events: list[dict[str, Any]] = []
        self.final: tuple[dict[str, Any], int] | None = None  # (status document, ttl_s)
        self.ttl_s: int | None = None  # expiry to set on every key of the run at commit
        self.unfinal = False  # the run is not finished any more (a retry): forget its final status
        # steps listed or unlisted under the worker running them, with this transaction's writes (a driver with
        # a worker registry applies them; the memory store has none): (worker id, job id, job or None to unlist)
        self.listing: list[tuple[str, str, dict[str, Any] | None]] = []
        self.jobs: dict[str, Job] = {}  # job id -> the Job whose dict this transaction put in OUTBOX (RunTxn.schedule)
        self.ancestors: list[str] = []  # subflow parents (outermost first): their keys get at least that expiry
        self.blueprint_id: str | None = None  # the run's blueprint, when the engine knows it (for observers)
        self.started: Blueprint | None = None  # set by the transaction that creates the run (a store may record it)
        # fields the run's next step will read (kind -> fields): a store with a cache may fetch them with the
        # commit, so that the next step reads nothing (a hint: nothing depends on it being followed)
        self.warm: dict[str, list[str]] = {}
        # the same, asked once per run and process under a tag (tag -> kind -> fields): what every step of the run
        # will read, fetched the first time this process commits a step of it
        self.warm_once: dict[str, dict[str, list[str]]] = {}
        # a driver with a queue (RedisStore) may take the queue's next ready job for this worker in the same
        # commit, locked for ``pick_ms`` (0: do not): the (job id, payload) it took, after the commit
        self.pick_ms = 0
        self.picked: Picked | None = None
        # a queue job this worker took itself whose last step this commit is: the commit finishes it in the queue
        self.finish_job: str | None = None
        self.unqueue: list[str] = []  # queue jobs whose steps this commit claimed: dropped from the queue
        # of those, the jobs nobody may be running: the commit holds only if none is locked by a worker (one that
        # runs its node before it claims it, ``Engine.defer_claims``)
        self.unheld: list[str] = []
        # how often this transaction was refused after claiming a queued sibling (``unheld``): after two, it
        # claims none (RunTxn.steal_queued): another worker is taking this run's queued steps
        self.steal_refusals = 0
        # job id -> the fields (kind -> fields) its step will read first: a store that queues the job in its
        # commit may send their values with it, so that a worker new to the run reads nothing before its claim
        # (a run's start jobs; a value sent that is stale by then only makes the claim decide again)
        self.seeds: dict[str, dict[str, list[str]]] = {}
        # values decoded further by the engine (its typed records), by (kind, field): valid as long as the
        # field is not written but through the same helper, which keeps the memo in step (``engine.state``)
        self.memo: dict[tuple[str, str], Any] = {}

    @abstractmethod
    async def _load(self, kind: str, fields: list[str]) -> list[str | bytes | None]: ...

    async def prefetch(self, wanted: dict[str, list[str]]) -> None:
        """Read these fields now, in one go where the store can (kind -> fields): a transaction that knows
        what it will read asks once instead of once per ``get``."""
        for kind, fields in wanted.items():
            await self.get_many(kind, fields)

    def assume_absent(self, wanted: dict[str, list[str]]) -> None:
        """Fields this transaction may take to be absent without reading them (a run being created): a store
        that checks every value read at commit (RedisStore) skips the read, and a wrong guess only makes the
        commit be refused and decided again. Others read as usual."""
        return None

    async def get(self, kind: str, field: str, default: Any = None) -> Any:
        key = (kind, field)
        if key in self._writes:
            v = self._writes[key]
            return default if v is MISSING else v.to_json() if isinstance(v, Record) else v
        if key not in self._cache:
            raw = (await self._load(kind, [field]))[0]
            self._cache[key] = MISSING if raw is None else self._loads(kind, field, raw)
        v = self._cache[key]
        return default if v is MISSING else v

    async def get_many(self, kind: str, fields: Iterable[str]) -> dict[str, Any]:
        writes, cache = self._writes, self._cache
        wanted = [(kind, f) for f in fields]
        todo = [key for key in wanted if key not in writes and key not in cache]
        if todo:
            for key, raw in zip(todo, await self._load(kind, [f for _, f in todo]), strict=True):
                cache[key] = MISSING if raw is None else self._loads(kind, key[1], raw)
        out: dict[str, Any] = {}
        for key in wanted:
            v = writes[key] if key in writes else cache[key]
            if v is not MISSING:
                out[key[1]] = v.to_json() if isinstance(v, Record) else v
        return out

    def _loads(self, kind: str, field: str, raw: str | bytes) -> Any:
        return load_field(raw, self.run_id, kind, field)

    def recall(self, kind: str, field: str) -> Any:
        """The ``Record`` a field holds as this transaction would read it, as it was written, where the store
        keeps the one it committed (the memory store: a record is decoded once, not by every transaction that
        reads it); else MISSING (read the field and decode it)."""
        return MISSING

    def put(self, kind: str, field: str, value: Any) -> None:
        """Write a JSON value, or a ``Record`` (encoded at the commit: it must not change after this)."""
        self._writes[(kind, field)] = value

    def delete(self, kind: str, field: str) -> None:
        self._writes[(kind, field)] = MISSING

    def event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    @property
    def dirty(self) -> bool:
        return bool(self._writes or self.events or self.final or self.listing)


class Store(ABC):
    """Where runs live. ``transact`` runs ``fn`` until it commits without a conflicting writer.
    ``on_commit`` (optional) sees each committed transaction once, after its commit: a transaction retried
    on a conflict is seen only as it finally committed (worker metrics count its events)."""

    on_commit: Callable[[Txn], None] | None = None
    enqueues = False  # does a commit queue the jobs it decides itself (else the driver queues the outbox)?

    @abstractmethod
    async def transact(self, run_id: str, fn: Callable[[Txn], Awaitable[T]]) -> T: ...

    @abstractmethod
    async def read(self, run_id: str, kind: str, fields: list[str]) -> list[Any]:
        """Non-transactional read of some fields (MISSING where absent)."""

    async def preload(self, run_id: str, wanted: dict[str, list[str]],
                      anew: dict[str, list[str]] | None = None) -> None:
        """Fetch fields (kind -> fields) into the store's memory of the run, in one go, if it keeps one
        (RedisStore): what the run's next transaction will read. Those of ``anew`` are read even if remembered:
        a ``peek`` then answers what the store holds now, not what this process last saw."""
        return None

    async def peek(self, run_id: str, kind: str, fields: list[str]) -> list[Any]:
        """Like ``read``, but a store that remembers fields (RedisStore) may answer from memory, possibly
        stale: for a decision a transaction checks again."""
        return await self.read(run_id, kind, fields)

    def forget(self, run_id: str) -> None:
        """Drop what the store remembers of a run, if it remembers anything (RedisStore)."""
        return None

    @abstractmethod
    async def read_all(self, run_id: str, kind: str, *, lenient: bool = False) -> dict[str, Any]:
        """``lenient``: a value that is not JSON reads as ``<undecodable: N bytes>`` (see ``loads``)."""

    @abstractmethod
    async def read_status(self, run_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def read_events(self, run_id: str) -> list[dict[str, Any]]: ...

    async def ack_jobs(self, run_id: str, job_ids: list[str]) -> None:
        """Forget outbox entries once the queue holds them."""
        if job_ids:
            await self._ack(run_id, job_ids)

    @abstractmethod
    async def _ack(self, run_id: str, job_ids: list[str]) -> None: ...


class _MemoryTxn(Txn):
    def __init__(self, run_id: str, data: dict[str, dict[str, Any]]) -> None:
        super().__init__(run_id)
        self._data = data

    def recall(self, kind: str, field: str) -> Any:
        if (kind, field) in self._writes:
            return MISSING
        got = self._data.get(kind, _NO_FIELDS).get(field)
        return got if isinstance(got, Record) else MISSING  # (a record kept as it was written: MemoryStore)

    reads_ahead = False

    async def prefetch(self, wanted: dict[str, list[str]]) -> None:
        return None  # every read is a dict lookup: reading ahead would only decode what may go unread

    async def _load(self, kind: str, fields: list[str]) -> list[str | bytes | None]:
        h = self._data.get(kind, _NO_FIELDS)
        return [h.get(f) for f in fields]

    async def get(self, kind: str, field: str, default: Any = None) -> Any:
        # (Txn.get, each read a dict lookup: no trip through _load, which a step would make dozens of times)
        key = (kind, field)
        v = self._writes.get(key, _UNSEEN)
        if v is not _UNSEEN:
            return default if v is MISSING else v.to_json() if isinstance(v, Record) else v
        v = self._cache.get(key, _UNSEEN)
        if v is _UNSEEN:
            raw = self._data.get(kind, _NO_FIELDS).get(field)
            v = self._cache[key] = MISSING if raw is None else _load_kept(raw, self.run_id, kind, field)
        return default if v is MISSING else v

    async def get_many(self, kind: str, fields: Iterable[str]) -> dict[str, Any]:
        # (Txn.get_many, as get above; the two by hand, not through a helper for one field: a call per field
        # cost 3 % of a chain's instructions)
        writes, cache, h, out = self._writes, self._cache, self._data.get(kind, _NO_FIELDS), {}
        for f in fields:
            key = (kind, f)
            v = writes.get(key, _UNSEEN)
            if v is _UNSEEN:
                v = cache.get(key, _UNSEEN)
                if v is _UNSEEN:
                    raw = h.get(f)
                    v = cache[key] = MISSING if raw is None else _load_kept(raw, self.run_id, kind, f)
            elif isinstance(v, Record):
                v = v.to_json()
            if v is not MISSING:
                out[f] = v
        return out


class MemoryStore(Store):
    """Runs in one process's memory. Values are kept JSON-encoded, exactly as in Redis, so the in-process
    runtime enforces the same rules (JSON-only values, no shared mutable objects). The engine's records whose
    every field is a plain scalar (``Record.plain``: a node's record, as a rule) are kept as they were written
    instead: nothing in them can be shared or be other than JSON, and every read copies them afresh
    (``to_json``), or, in a transaction, takes them as they are (``Txn.recall``): records are never changed
    once written."""

    EVENT_CAP = 10_000

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, dict[str, Any]]] = {}  # run -> kind -> field -> JSON text, or a Record
        self._status: dict[str, dict[str, Any]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def transact(self, run_id: str, fn: Callable[[Txn], Awaitable[T]]) -> T:
        lock = self._locks.get(run_id)
        if lock is None:
            lock = self._locks[run_id] = asyncio.Lock()
        async with lock:
            txn = _MemoryTxn(run_id, self._runs.get(run_id, {}))
            result = await fn(txn)
            if txn.dirty:
                data = self._runs.setdefault(run_id, {})
                texts: dict[int, str] = {}  # (see encode_once)
                for (kind, field), value in txn._writes.items():
                    h = data.setdefault(kind, {})
                    if value is MISSING:
                        h.pop(field, None)
                    elif isinstance(value, Record) and value.plain():
                        h[field] = value
                    else:
                        h[field] = encode_once(kind, value, texts, dumps)
                if txn.events:
                    events = self._events.setdefault(run_id, [])
                    events.extend(txn.events)
                    del events[: max(0, len(events) - self.EVENT_CAP)]
                if txn.unfinal:
                    self._status.pop(run_id, None)
                if txn.final:
                    self._status[run_id] = txn.final[0]
                if self.on_commit is not None:
                    self.on_commit(txn)
            return result

    async def read(self, run_id: str, kind: str, fields: list[str]) -> list[Any]:
        h = self._runs.get(run_id, {}).get(kind, {})
        return [_load_kept(h[f], run_id, kind, f) if f in h else MISSING for f in fields]

    async def read_all(self, run_id: str, kind: str, *, lenient: bool = False) -> dict[str, Any]:
        return {f: _load_kept(v, run_id, kind, f, lenient=lenient)
                for f, v in self._runs.get(run_id, {}).get(kind, {}).items()}

    async def read_status(self, run_id: str) -> dict[str, Any] | None:
        return self._status.get(run_id)

    async def read_events(self, run_id: str) -> list[dict[str, Any]]:
        return list(self._events.get(run_id, []))

    async def _ack(self, run_id: str, job_ids: list[str]) -> None:
        outbox = self._runs.get(run_id, {}).get(OUTBOX, {})
        for j in job_ids:
            outbox.pop(j, None)
