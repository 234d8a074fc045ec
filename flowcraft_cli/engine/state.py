"""A run's stored state, typed: statuses and kinds (StrEnums), the records kept in the run's hashes
(``RunMeta``, ``NodeRecord``, ``BatchItem``, join ``Arrival``s) and the one codec for composite field names.

Records meet JSON only here: ``from_json`` / ``to_json`` at the store boundary, through ``read_*`` /
``write_*`` helpers over a ``Txn``. The stored JSON keeps the field names the engine always wrote (``view``,
the CLI, other workers and tests read them): an optional field is ``None`` exactly when it is absent from
the stored object, and an unknown field read from the store is kept and written back as it was (a newer
worker's field survives an older worker's update).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Self, TypeVar

from ..ids import field_name
from ..store import BATCH, JOINS, MISSING, NODES, RUN, Record, Store, Txn

if TYPE_CHECKING:
    import asyncio


class RunStatus(StrEnum):
    RUNNING = "running"
    AWAITING = "awaiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NodeStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SLEEPING = "sleeping"
    AWAITING = "awaiting"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"  # was waiting or running when its run was cancelled


class Recovery(StrEnum):
    """What recovering a step of a dead (or dropped) claim found."""

    NOTHING = "nothing"  # the step already moved on: nothing to do
    UNKNOWN = "unknown"  # this worker cannot judge the run (blueprint or version not loaded), or the step moved
    #                      on as it looked (engine._listed_step): leave it listed, to be looked at again
    REQUEUE = "requeue"  # the step was never claimed: queue the same job again
    HELD = "held"  # a live worker holds the step (it came back): not recovered, and its entry stays
    RECOVERED = "recovered"  # a claimed step was lost: recorded, and a new job (a new id) scheduled


class StepOutcome(StrEnum):
    """What handling one job came to (``Handled.outcome``); the worker's log line says it."""

    OK = "ok"  # the step ran (its node attempt may still have failed: ``Handled.failed``)
    STALE = "stale"  # the node no longer expects this step: a duplicate or late delivery, nothing done
    HELD_ELSEWHERE = "held elsewhere"  # a live worker runs this very step: this copy has nothing to do
    RUN_FINISHED = "run finished"  # the run had ended before this step: nothing done
    UNKNOWN_RUN = "unknown run"  # the run does not exist (expired or never started): dropped
    UNKNOWN_NODE = "unknown node"  # the node is not in the run's blueprint: dropped
    VERSION_MISMATCH = "version mismatch"  # this worker lacks the run's blueprint version: try again later
    VERSION_GRACE_EXPIRED = "version grace expired"  # no matching worker came in time: the run failed


_RUN_STATUSES: dict[str, RunStatus] = {s.value: s for s in RunStatus}
E = TypeVar("E", bound=StrEnum)


def _member(enum: type[E], members: dict[str, E], value: Any) -> E:
    """An enum member from its stored value: a dict lookup (the enum's own call costs ten times as much),
    else the enum's own call, and its ValueError for a value that is none of them."""
    got = members.get(value) if isinstance(value, str) else None
    return got if got is not None else enum(value)


FINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
RESTING_STATUSES = FINAL_STATUSES | {RunStatus.AWAITING}
ACTIVE_NODE = frozenset({NodeStatus.QUEUED, NodeStatus.RUNNING, NodeStatus.SLEEPING, NodeStatus.AWAITING})


def now_ms() -> int:
    return int(time.time() * 1000)


class JobKind(StrEnum):
    """A job's kind (``jobs.Job.kind``), and a node record's ``phase`` (EXEC or FALLBACK)."""

    EXEC = "exec"  # run the node (attempt N)
    FALLBACK = "fallback"  # run the node's fallback (attempt N)
    ITEM = "item"  # one batch item
    GATHER = "gather"  # finish a batch
    WAKE = "wake"  # end a sleep
    CHILD = "child"  # a subflow's child run has finished
    CHILD_WAIT = "child_wait"  # a subflow's child run rests awaiting


class ItemStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


R = TypeVar("R")
REF: Any = object()  # "the source's output": resolved from _outputs.<source> when the target fires


# ---------------------------------------------------------------------------------------------- field names
# Every part is escaped by ids.field_name, so node ids holding "|" or "#" cannot collide (CONTRACT §6.1).


def arrival_field(target: str, gen: int, source: str) -> str:
    """JOINS: ``source``'s arrival at ``target`` in generation ``gen``."""
    return field_name(target, gen, source)


def count_field(target: str, gen: int) -> str:
    """JOINS: a join's ``[decided, taken]`` count: a bare ``#`` part, which no escaped source id can be."""
    return field_name(target, gen) + "|#"


def batch_size_field(node_id: str, seq: int) -> str:
    """BATCH: how many items the batch has."""
    return field_name(node_id, seq, "n")


def batch_done_field(node_id: str, seq: int) -> str:
    """BATCH: how many items are done."""
    return field_name(node_id, seq, "done")


def batch_input_field(node_id: str, seq: int, item: int) -> str:
    """BATCH: an item's input."""
    return field_name(node_id, seq, "i", item)


def batch_state_field(node_id: str, seq: int, item: int) -> str:
    """BATCH: an item's ``BatchItem``."""
    return field_name(node_id, seq, "s", item)


def batch_result_field(node_id: str, seq: int, item: int) -> str:
    """BATCH: an item's result."""
    return field_name(node_id, seq, "r", item)


# ---------------------------------------------------------------------------------------------- records


_NAMES: dict[type, tuple[str, ...]] = {}  # a record class -> its stored field names (``extra`` aside)
_NAME_SETS: dict[type, frozenset[str]] = {}  # the same, as a set
_EVERY: dict[type, Callable[[Any], tuple[Any, ...]]] = {}  # the same, ``extra`` included, in __init__'s order


def _names(cls: type) -> tuple[str, ...]:
    got = _NAMES.get(cls)
    if got is None:
        got = _NAMES[cls] = tuple(f.name for f in fields(cls) if f.name != "extra")
        _NAME_SETS[cls] = frozenset(got)
        _EVERY[cls] = attrgetter(*(f.name for f in fields(cls)))
    return got


def _split(cls: type, data: Mapping[str, Any], what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The known fields of ``cls`` in ``data``, and the rest."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(data).__name__}")
    _names(cls)
    names = _NAME_SETS[cls]
    if names.issuperset(data):  # (every record a worker of this release wrote)
        return dict(data), {}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


def _present(rec: Any, always: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of a record that are stored: the ``always`` ones, and every other that is not None (in the
    class's order, an ``always`` one that is None last)."""
    cls = type(rec)
    fn = _PRESENT.get((cls, always))
    if fn is None:
        fn = _PRESENT[(cls, always)] = _compile_present(_names(cls), always)
    return fn(rec)


_PRESENT: dict[tuple[type, tuple[str, ...]], Callable[[Any], dict[str, Any]]] = {}


def _compile_present(names: tuple[str, ...], always: tuple[str, ...]) -> Callable[[Any], dict[str, Any]]:
    """``_present`` for one record class, as straight-line code: a record is encoded at every commit that
    writes it (on workers) and read whole by every view, and a loop over its thirty fields cost twice this."""
    lines = ["def present(r):", "    out = {}"]
    for name in names:
        lines += [f"    v = r.{name}", f"    if v is not None: out[{name!r}] = v"]
    lines += [f"    if {name!r} not in out: out[{name!r}] = None" for name in always]
    lines.append("    return out")
    scope: dict[str, Any] = {}
    exec("\n".join(lines), scope)  # (names are a dataclass's field names: identifiers)
    return scope["present"]  # type: ignore[no-any-return]


def evolve(rec: R, **changes: Any) -> R:
    """``dataclasses.replace`` for the records here, a third of its cost (every step replaces a few): a copy
    with ``changes`` (an unknown name raises AttributeError, as the slots refuse it)."""
    cls = type(rec)
    if cls not in _EVERY:
        _names(cls)
    new = cls(*_EVERY[cls](rec))
    for name, value in changes.items():
        setattr(new, name, value)
    return new


@dataclass(slots=True)
class ParentRef:
    """A subflow child run's parent: the node (and its firing and attempt) that started it."""

    run_id: str
    node_id: str
    seq: int
    attempt: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(str(data["run_id"]), str(data["node_id"]), int(data["seq"]), int(data["attempt"]))

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "node_id": self.node_id, "seq": self.seq, "attempt": self.attempt}


@dataclass(slots=True)
class RunMeta:
    """The run's meta hash (RUN), one stored field per attribute (``META_FIELDS``). Read whole; written
    field by field, only the fields a transaction changes (``RunTxn.set_meta``)."""

    status: RunStatus | None  # None: the run does not exist (never started, or its keys expired)
    reason: str | None = None
    blueprint_id: str = ""
    blueprint_version: str = ""
    pending: int = 0
    awaiting_nodes: list[str] = field(default_factory=list)
    created_at: int | None = None
    finished_at: int | None = None
    parent: ParentRef | None = None
    failed_node: str | None = None
    version_wait_since: int | None = None
    keep_until: int | None = None  # epoch ms: the run's keys live at least until then (a long sleep)
    ancestors: list[str] = field(default_factory=list)  # subflow parents, outermost first
    queue: str | None = None  # written by the Redis store at the run's start

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> Self:
        """From the meta hash's fields (absent or null ones missing or None)."""
        parent = values.get("parent")
        status = values.get("status")
        return cls(
            status=None if status is None else _member(RunStatus, _RUN_STATUSES, status),
            reason=values.get("reason"),
            blueprint_id=values.get("blueprint_id") or "", blueprint_version=values.get("blueprint_version") or "",
            pending=int(values.get("pending") or 0), awaiting_nodes=list(values.get("awaiting_nodes") or []),
            created_at=values.get("created_at"), finished_at=values.get("finished_at"),
            parent=None if not parent else ParentRef.from_json(parent), failed_node=values.get("failed_node"),
            version_wait_since=values.get("version_wait_since"), keep_until=values.get("keep_until"),
            ancestors=list(values.get("ancestors") or []), queue=values.get("queue"),
        )

    def field_json(self, name: str) -> Any:
        """One field as it is stored."""
        value = getattr(self, name)
        if isinstance(value, StrEnum):
            return value.value
        if isinstance(value, ParentRef):
            return value.to_json()
        if isinstance(value, list):
            return list(value)
        return value


META_FIELDS = tuple(f.name for f in fields(RunMeta))
# what tells whether a step may run on this worker: the run exists and is not finished, and is of a blueprint
# version this worker has (``Engine._handle``, before reading the rest)
GATE_FIELDS = ("status", "blueprint_id", "blueprint_version", "version_wait_since")
# what a first delivery reads anew of the meta, with the node's record and input, before it runs its node
# unclaimed (``Step._defer_claim``): the run is running, and of the step's blueprint
DEFER_FIELDS = ("status", "blueprint_id", "blueprint_version")


@dataclass(slots=True)
class Held:
    """A loop-back arrival a loop-controller holds while its body is busy (``NodeRecord.held``)."""

    source: str
    value: Any = REF  # REF: the source's output

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(str(data["src"]), data["v"] if "v" in data else REF)

    def to_json(self) -> dict[str, Any]:
        return {"src": self.source, **({} if self.value is REF else {"v": self.value})}


@dataclass(slots=True)
class NodeRecord(Record):
    """A node's record (NODES). ``status``, ``seq``, ``runs`` and ``gen`` are always stored; every other
    field is ``None`` exactly when it is absent from the stored object."""

    status: NodeStatus = NodeStatus.PENDING
    seq: int = 0  # which firing: each fire (a retry of the run, a loop iteration) makes a new one
    runs: int = 0  # how many times it finished
    gen: int = 0  # its loop generation: a loop ``continue`` moves the body to the next one
    fired_gen: int | None = None  # the generation it was last fired or skipped in
    attempt: int | None = None
    phase: JobKind | None = None  # EXEC or FALLBACK; absent reads as EXEC
    queued_at: int | None = None
    iter: int | None = None  # loop-controllers: iterations run
    busy: int | None = None  # loop-controllers: body nodes fired and not finished
    held: Held | None = None  # loop-controllers: the loop-back arrival waiting for an idle body
    token: str | None = None  # the claim of the step running it (its commit must find it)
    worker: str | None = None
    job: str | None = None  # the job id of the claimed step
    attempt_started_at: int | None = None
    started_at: int | None = None
    finished_at: int | None = None
    error: str | None = None
    action: str | None = None
    child: str | None = None  # subflows: the child run
    items: int | None = None  # batches: how many items, once expanded
    retry_at: int | None = None
    exec_attempts: int | None = None  # attempts of the node itself, once its fallback runs
    fallback: str | None = None  # the fallback node running (or run) for it
    fallback_for: str | None = None  # on a fallback node's own record: the node it stood in for
    lost_in_row: int | None = None
    recovery: int | None = None  # how often its step was recovered (part of the job id)
    wake_at: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown stored fields, kept as they were

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        known, extra = _split(cls, data, "a node record")
        if "status" in known:
            status = known["status"]
            known["status"] = _member(NodeStatus, _NODE_STATUSES, status)
        if known.get("phase") is not None:
            known["phase"] = JobKind(known["phase"])
        if known.get("held") is not None:
            known["held"] = Held.from_json(known["held"])
        return cls(**known, extra=extra)

    def to_json(self) -> dict[str, Any]:
        out = _present(self, ("status", "seq", "runs", "gen"))
        out["status"] = self.status.value
        if self.phase is not None:
            out["phase"] = self.phase.value
        if self.held is not None:
            out["held"] = self.held.to_json()
        return {**self.extra, **out} if self.extra else out

    def plain(self) -> bool:
        return self.held is None and not self.extra  # (every other field is a scalar: store.Record.plain)

    @property
    def current_phase(self) -> JobKind:
        return self.phase or JobKind.EXEC


_NODE_STATUSES: dict[str, NodeStatus] = {s.value: s for s in NodeStatus}


@dataclass(slots=True)
class BatchItem(Record):
    """One batch item's bookkeeping (BATCH ``batch_state_field``): its attempt and claim."""

    status: ItemStatus
    attempt: int
    recovery: int | None = None
    lost_in_row: int | None = None
    token: str | None = None
    worker: str | None = None
    job: str | None = None
    attempt_started_at: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown stored fields, kept as they were

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        known, extra = _split(cls, data, "a batch item")
        known["status"] = ItemStatus(known["status"])
        return cls(**known, extra=extra)

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, **_present(self, ("status", "attempt")), "status": self.status.value}


@dataclass(slots=True)
class Arrival(Record):
    """A predecessor's arrival at a join (JOINS ``arrival_field``): taken or not, and the value it
    delivers (REF: the source's output)."""

    taken: bool
    value: Any = REF

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(bool(data.get("t")), data["v"] if "v" in data else REF)

    def to_json(self) -> dict[str, Any]:
        if self.value is REF or not self.taken:
            return {"t": self.taken}
        return {"t": True, "v": self.value}


# ---------------------------------------------------------------------------------------------- in a Txn
# (and, for what a step reads before its transaction, straight from the Store)


async def fetch_node(store: Store, run_id: str, node_id: str) -> NodeRecord | None:
    """A node's record, read outside any transaction."""
    got = (await store.read(run_id, NODES, [node_id]))[0]
    return None if got is MISSING else NodeRecord.from_json(got)


async def fetch_all_nodes(store: Store, run_id: str) -> dict[str, NodeRecord]:
    """Every node record of a run, read outside any transaction."""
    return {k: NodeRecord.from_json(v) for k, v in (await store.read_all(run_id, NODES)).items()}


async def fetch_meta(store: Store, run_id: str, *, cached: bool = False,
                     fields: tuple[str, ...] = META_FIELDS) -> RunMeta:
    """The run's meta, read outside any transaction (``status`` None: no such run). ``cached``: as the
    store last saw it, where it remembers (``Store.peek``): only a hint, to be checked by a transaction.
    ``fields``: only these (the others read as absent)."""
    values = await (store.peek if cached else store.read)(run_id, RUN, list(fields))
    return RunMeta.from_fields({k: v for k, v in zip(fields, values, strict=True) if v is not MISSING})


async def read_node(t: Txn, node_id: str) -> NodeRecord | None:
    """A node's record in a transaction: decoded once per transaction (a step reads its own and its
    successors' records several times). Records are never changed in place (``evolve``), so sharing is safe."""
    key = (NODES, node_id)
    got = t.memo.get(key, MISSING)
    if got is MISSING:
        got = t.recall(NODES, node_id)
        if got is MISSING:
            data = await t.get(NODES, node_id)
            got = None if data is None else NodeRecord.from_json(data)
        t.memo[key] = got
    return got


async def read_nodes(t: Txn, node_ids: Iterable[str]) -> dict[str, NodeRecord]:
    """The records of ``node_ids`` that exist. All of a run's are read by its blueprint's node ids, field by
    field, never as a whole hash: a store may keep them with more (RedisStore: the run's events), which a
    whole read would fetch, and whose every change a whole read's check would refuse."""
    node_ids, out = list(node_ids), {}
    for node_id in node_ids:
        rec = t.memo.get((NODES, node_id), MISSING)
        if rec is MISSING:
            return {k: NodeRecord.from_json(v) for k, v in (await t.get_many(NODES, node_ids)).items()}
        if rec is not None:
            out[node_id] = rec
    return out


def write_node(t: Txn, node_id: str, rec: NodeRecord) -> None:
    t.put(NODES, node_id, rec)  # (encoded at the commit: the last of a node's writes in a transaction only)
    t.memo[(NODES, node_id)] = rec


async def read_meta(t: Txn) -> RunMeta:
    got = await t.get_many(RUN, META_FIELDS)
    return RunMeta.from_fields(got)


async def read_item(t: Txn, node_id: str, seq: int, item: int) -> BatchItem | None:
    data = await t.get(BATCH, batch_state_field(node_id, seq, item))
    return None if data is None else BatchItem.from_json(data)


def write_item(t: Txn, node_id: str, seq: int, item: int, st: BatchItem) -> None:
    t.put(BATCH, batch_state_field(node_id, seq, item), st)


async def read_arrivals(t: Txn, target: str, gen: int, sources: Iterable[str]) -> dict[str, Arrival]:
    """The arrivals at ``target`` in ``gen`` from ``sources``, by source."""
    by_field = {arrival_field(target, gen, s): s for s in sources}
    got = await t.get_many(JOINS, by_field)
    return {by_field[f]: Arrival.from_json(v) for f, v in got.items()}


async def read_arrival(t: Txn, target: str, gen: int, source: str) -> Arrival | None:
    data = await t.get(JOINS, arrival_field(target, gen, source))
    return None if data is None else Arrival.from_json(data)


def write_arrival(t: Txn, target: str, gen: int, source: str, arrival: Arrival) -> None:
    t.put(JOINS, arrival_field(target, gen, source), arrival)


async def read_count(t: Txn, target: str, gen: int) -> tuple[int, int] | None:
    """A join's ``(decided, taken)`` count in ``gen``, None when nothing arrived yet."""
    got = await t.get(JOINS, count_field(target, gen))
    return None if not got else (int(got[0]), int(got[1]))


def write_count(t: Txn, target: str, gen: int, counts: tuple[int, int]) -> None:
    t.put(JOINS, count_field(target, gen), list(counts))


@dataclass(slots=True)
class InlineStep:
    """A successor a committing step claimed for its own worker, in its commit (CONTRACT §6: a worker may run
    the successors it makes ready): it runs next, on the same worker, without going through the queue. It is
    listed under the worker as ``list_as`` (the queue job its chain started from: it takes that entry over,
    unchanged, and its claim names it), so it is held, and recovered if the worker dies, exactly like a
    claimed queued step."""

    job: Any  # jobs.Job
    token: str
    record: NodeRecord
    node_input: Any
    list_as: str
    # its node, already running: run ahead of the commit that claimed it (engine.ahead), awaited, not called again
    running: asyncio.Future[Any] | None = None  # (function.call_node's task, or its end: eager.start)
