"""Every Redis key flowcraft writes, in one place.

Per run (all expire ``state.ttl_seconds`` after the run ends, and ``state.running_ttl_seconds`` after the
last step of a run that never ends; a subflow child's steps extend its ancestors' keys as far as its own):

  workflow:state:<run_id>      HASH   the run context, JSON values (Flowcraft layout: _outputs.<node>, ...)
  workflow:status:<run_id>     STRING the final result {"status", "reason", "payload"}, written once
  flowcraft:run:<run_id>       HASH   the run's coordination state, one hash so that a step reads and writes
                                      it with one command each and the run has fewer keys to expire:
                                        <name>     run meta (status, blueprint id/version, pending count,
                                                   timestamps, the queue it was started on); names are
                                                   identifiers, never holding ':'
                                        n:<node>   node record (status, seq, attempt, timings, error, worker)
                                        j:<field>  join arrival per (target, generation, source)
                                        e:<n>      the run's n-th event (the last EVENT_CAP are kept);
                                                   ``events`` counts them
  flowcraft:batch:<run_id>     HASH   batch items and results
  flowcraft:outbox:<run_id>    HASH   jobs decided but not yet confirmed in the queue
  flowcraft:progress:<run_id>  STRING time of the run's last step; written by its steps (not by its start: until
                                      one writes it, the run's created_at stands in) and read by nothing,
                                      so its OBJECT IDLETIME is "time since progress" (reads of the run,
                                      e.g. `inspect`, do not reset it, unlike the state hash's); deleted
                                      when the run ends

Workers (CONTRACT §6.1):

  flowcraft:worker:<id>        HASH   a live worker: host, pid, queue, blueprints (id -> version), concurrency,
                                      started_at, heartbeat_at, running; expires lease_seconds after its
                                      last heartbeat, so "the key exists" is "the worker is alive"
  flowcraft:worker-steps:<id>  HASH   job id -> job: the steps this worker holds, written by the transaction
                                      that claims a step and deleted by the one that commits it; what is left
                                      when the worker dies is what to recover (outlives the worker key)
  flowcraft:workers:<queue>    ZSET   worker id -> last heartbeat (Redis server time, ms): the workers of
                                      one queue, live and recently dead; a dead one is removed once its
                                      steps are recovered
  flowcraft:workers-seen:<queue> HASH worker id -> {"heartbeat_at", "fields"} as of its last heartbeat, so
                                      `flowcraft workers` can still show a dead worker (host, pid) as lost;
                                      an entry is dropped by a clean stop, or by any worker's heartbeat once
                                      the worker has been gone for more than lease_seconds

Blueprints and the run index (CONTRACT §10: views need only Redis):

  flowcraft:blueprint:<id>:<version>   STRING the blueprint document (JSON) a run of that version uses,
                                      written when such a run starts; it expires no sooner than any run that
                                      uses it (every transaction of a run extends it as far as the run's own
                                      keys). ``:`` and ``%`` in the id are escaped (%3A, %25)
  flowcraft:runs-by-status:<group>:<queue>  ZSET  run id -> created_at (ms): the runs started on a queue
                                      by status group (active = running or awaiting, completed, failed,
                                      cancelled), moved whenever a run's status changes (all of a queue's
                                      runs, newest first, are a merge of its groups);
                                      each also holds a placeholder member "" (no run has that id) scored
                                      -inf, so that a group is never emptied, and so never created again
                                      without an expiry, when its last run moves on
  flowcraft:runs-expiry:<queue>        ZSET   run id -> when its keys were last due to expire (ms); each index
                                      write looks at entries past due and drops those whose run is gone,
                                      so index entries expire with their runs (no SCAN)
  (each index key expires no sooner than the longest-lived run of its queue: a run's start, finish and
  status changes extend them as far as the run's own keys, and its other steps at most every
  min(60 s, TTL/4) per process)

Queue wake-ups:

  flowcraft:wake:<queue>       LIST   a token per job made ready, capped: idle workers block on it (BLPOP)
                                      instead of polling arq's queue

Shared:

  flowcraft:coord:<name>       coordination-store keys (RedisCoordinationStore); the reconciler's
                               per-run lock is flowcraft:coord:reconcile:<run_id>
  <queue name>, arq:job:<id>, arq:in-progress:<id>, arq:retry:<id>   arq's own keys (see arq.constants)

Earlier versions' (read only by ``flowcraft migrate``, which moves them into the run's hash):

  flowcraft:nodes:<run_id>, flowcraft:joins:<run_id> (HASH), flowcraft:events:<run_id> (LIST)
"""

from __future__ import annotations

from collections.abc import Iterable

from ..store import BATCH, JOINS, NODES, OUTBOX, RUN, STATE

STATE_PREFIX = "workflow:state:"
STATUS_PREFIX = "workflow:status:"
PROGRESS_PREFIX = "flowcraft:progress:"
COORD_PREFIX = "flowcraft:coord:"
WORKER_PREFIX = "flowcraft:worker:"
WORKER_STEPS_PREFIX = "flowcraft:worker-steps:"
WORKERS_PREFIX = "flowcraft:workers:"
WORKERS_SEEN_PREFIX = "flowcraft:workers-seen:"
BLUEPRINT_PREFIX = "flowcraft:blueprint:"
RUNS_BY_STATUS_PREFIX = "flowcraft:runs-by-status:"
RUNS_EXPIRY_PREFIX = "flowcraft:runs-expiry:"
#: status groups of the run index; a run's meta status maps to one (running and awaiting are "active")
RUN_GROUPS = ("active", "completed", "failed", "cancelled")
#: a member of every status group that is no run (run ids are 1 to 128 characters): readers skip it
GROUP_PLACEHOLDER = ""

RUN_PREFIX = "flowcraft:run:"
#: the run's events: a kind of the Redis store's own (the engine's transactions collect them in ``Txn.events``),
#: numbered from 1 by the run's ``EVENT_COUNT`` field
EVENTS = "events"
EVENT_COUNT = "events"
_KIND_PREFIX = {
    STATE: STATE_PREFIX,
    RUN: RUN_PREFIX,
    NODES: RUN_PREFIX,
    JOINS: RUN_PREFIX,
    EVENTS: RUN_PREFIX,
    BATCH: "flowcraft:batch:",
    OUTBOX: "flowcraft:outbox:",
}
#: kinds kept as fields of the run's hash, behind a prefix each (the meta's own fields have none)
FIELD_PREFIX = {NODES: "n:", JOINS: "j:", EVENTS: "e:"}
_PREFIX_KIND = {p: k for k, p in FIELD_PREFIX.items()}


def kind_key(kind: str, run_id: str) -> str:
    """The hash that holds a run's fields of ``kind`` (the meta, node records, joins and events share one)."""
    return _KIND_PREFIX[kind] + run_id


def field_name(kind: str, name: str) -> str:
    """The stored name of a field of ``kind`` in its hash (``kind_key``)."""
    prefix = FIELD_PREFIX.get(kind)
    return name if prefix is None else prefix + name


def field_names(kind: str, names: Iterable[str]) -> list[str]:
    """``field_name`` of each of ``names``."""
    prefix = FIELD_PREFIX.get(kind, "")
    return [prefix + n for n in names]


def run_hash_field(stored: str) -> tuple[str, str]:
    """(kind, name) of a field of the run's hash, from its stored name."""
    kind = _PREFIX_KIND.get(stored[:2])
    return (RUN, stored) if kind is None else (kind, stored[2:])


def status_key(run_id: str) -> str:
    return STATUS_PREFIX + run_id


def progress_key(run_id: str) -> str:
    return PROGRESS_PREFIX + run_id


def run_keys(run_id: str) -> list[str]:
    """Every key of one run, for expiry and for tests that check nothing is left behind."""
    return [*dict.fromkeys(kind_key(k, run_id) for k in _KIND_PREFIX), status_key(run_id), progress_key(run_id)]


def coord_key(name: str) -> str:
    return COORD_PREFIX + name


def worker_key(worker_id: str) -> str:
    return WORKER_PREFIX + worker_id


def worker_steps_key(worker_id: str) -> str:
    return WORKER_STEPS_PREFIX + worker_id


def workers_key(queue_name: str) -> str:
    return WORKERS_PREFIX + queue_name


def workers_seen_key(queue_name: str) -> str:
    return WORKERS_SEEN_PREFIX + queue_name


def blueprint_key(blueprint_id: str, version: str) -> str:
    """The stored definition of one blueprint version; the id is escaped so that the last ``:`` always
    separates the version (an id ``a:b`` at version ``1`` and an id ``a`` at version ``b:1`` stay apart)."""
    return f"{BLUEPRINT_PREFIX}{blueprint_id.replace('%', '%25').replace(':', '%3A')}:{version}"


def runs_by_status_key(group: str, queue_name: str) -> str:
    return f"{RUNS_BY_STATUS_PREFIX}{group}:{queue_name}"


def runs_expiry_key(queue_name: str) -> str:
    return RUNS_EXPIRY_PREFIX + queue_name


def run_group(status: str) -> str:
    """The index group of a run status (``running``/``awaiting`` -> ``active``)."""
    return "active" if status in ("running", "awaiting") else status


def run_index_keys(queue_name: str) -> list[str]:
    """Every index key of one queue: the expiry index, then one per status group."""
    return [runs_expiry_key(queue_name), *(runs_by_status_key(g, queue_name) for g in RUN_GROUPS)]


WAKE_PREFIX = "flowcraft:wake:"

#: a run's keys in the layout of versions before one hash a run, which ``flowcraft migrate`` moves into it:
#: node records, join arrivals (hashes) and events (a list)
LEGACY_NODES_PREFIX = "flowcraft:nodes:"
LEGACY_JOINS_PREFIX = "flowcraft:joins:"
LEGACY_EVENTS_PREFIX = "flowcraft:events:"


def legacy_keys(run_id: str) -> list[str]:
    return [p + run_id for p in (LEGACY_NODES_PREFIX, LEGACY_JOINS_PREFIX, LEGACY_EVENTS_PREFIX)]


def wake_key(queue_name: str) -> str:
    return WAKE_PREFIX + queue_name
