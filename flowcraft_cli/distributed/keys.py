"""Every Redis key flowcraft writes, in one place.

Per run (all expire ``state.ttl_seconds`` after the run ends, and ``state.running_ttl_seconds`` after the
last step of a run that never ends; a subflow child's steps extend its ancestors' keys as far as its own):

  workflow:state:<run_id>      HASH   the run context, JSON values (Flowcraft layout: _outputs.<node>, ...)
  workflow:status:<run_id>     STRING the final result {"status", "reason", "payload"}, written once
  flowcraft:run:<run_id>       HASH   run meta (status, blueprint id/version, pending count, timestamps, rev)
  flowcraft:nodes:<run_id>     HASH   node_id -> node record (status, seq, attempt, timings, error, worker)
  flowcraft:joins:<run_id>     HASH   join arrivals per (target, generation, source)
  flowcraft:batch:<run_id>     HASH   batch items and results
  flowcraft:outbox:<run_id>    HASH   jobs decided but not yet confirmed in the queue
  flowcraft:events:<run_id>    LIST   the run's events (capped)
  flowcraft:progress:<run_id>  STRING time of the run's last step; written by every step and read by nothing,
                                      so its OBJECT IDLETIME is "time since progress" (reads of the run,
                                      e.g. `inspect`, do not reset it, unlike the state hash's)

Shared:

  flowcraft:coord:<name>       coordination-store keys (RedisCoordinationStore); the reconciler's
                               per-run lock is flowcraft:coord:reconcile:<run_id>
  <queue name>, arq:job:<id>, arq:in-progress:<id>, arq:retry:<id>   arq's own keys (see arq.constants)
"""

from __future__ import annotations

from ..store import BATCH, JOINS, NODES, OUTBOX, RUN, STATE

STATE_PREFIX = "workflow:state:"
STATUS_PREFIX = "workflow:status:"
EVENTS_PREFIX = "flowcraft:events:"
PROGRESS_PREFIX = "flowcraft:progress:"
COORD_PREFIX = "flowcraft:coord:"

_KIND_PREFIX = {
    STATE: STATE_PREFIX,
    RUN: "flowcraft:run:",
    NODES: "flowcraft:nodes:",
    JOINS: "flowcraft:joins:",
    BATCH: "flowcraft:batch:",
    OUTBOX: "flowcraft:outbox:",
}


def kind_key(kind: str, run_id: str) -> str:
    return _KIND_PREFIX[kind] + run_id


def status_key(run_id: str) -> str:
    return STATUS_PREFIX + run_id


def events_key(run_id: str) -> str:
    return EVENTS_PREFIX + run_id


def progress_key(run_id: str) -> str:
    return PROGRESS_PREFIX + run_id


def run_keys(run_id: str) -> list[str]:
    """Every key of one run, for expiry and for tests that check nothing is left behind."""
    return [kind_key(k, run_id) for k in _KIND_PREFIX] + [status_key(run_id), events_key(run_id),
                                                          progress_key(run_id)]


def coord_key(name: str) -> str:
    return COORD_PREFIX + name
