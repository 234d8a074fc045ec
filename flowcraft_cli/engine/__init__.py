"""Run semantics, written once (CONTRACT §5), for both runtimes. ``engine.Engine`` is the door. Behind it:
``state`` (statuses, typed stored records, field names), the pure decisions ``routing``, ``joins`` and
``loops``, ``reads`` (what a step reads outside a transaction), ``lifecycle`` (one run inside one
transaction), ``step`` (claim, work, commit) and ``builtins`` (one module per built-in)."""

from .builtins.function import idempotency_key, user_traceback
from .engine import Engine, EngineSettings, Handled
from .state import (
    FINAL_STATUSES,
    RESTING_STATUSES,
    NodeStatus,
    Recovery,
    RunStatus,
    StepOutcome,
    now_ms,
)

__all__ = [
    "FINAL_STATUSES",
    "RESTING_STATUSES",
    "Engine",
    "EngineSettings",
    "Handled",
    "NodeStatus",
    "Recovery",
    "RunStatus",
    "StepOutcome",
    "idempotency_key",
    "now_ms",
    "user_traceback",
]
