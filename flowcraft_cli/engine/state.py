"""The vocabulary of a run's stored state: run and node statuses, what a step or a recovery found, and the
run meta fields the engine reads."""

from __future__ import annotations

import time
from enum import StrEnum

from ..ids import field_name


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
    UNKNOWN = "unknown"  # this worker cannot judge the run (blueprint or version not loaded): leave it
    REQUEUE = "requeue"  # the step was never claimed: queue the same job again
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


FINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
RESTING_STATUSES = FINAL_STATUSES | {RunStatus.AWAITING}
ACTIVE_NODE = frozenset({NodeStatus.QUEUED, NodeStatus.RUNNING, NodeStatus.SLEEPING, NodeStatus.AWAITING})
META_FIELDS = ("status", "reason", "blueprint_id", "blueprint_version", "pending", "awaiting_nodes",
               "created_at", "finished_at", "parent", "failed_node", "version_wait_since", "keep_until",
               "ancestors", "queue")


def now_ms() -> int:
    return int(time.time() * 1000)


def count_field(tgt: str, gen: int) -> str:
    """A join's ``[decided, taken]`` count: a bare ``#`` part, which no escaped source id can be."""
    return field_name(tgt, gen) + "|#"
