"""Loops (CONTRACT §5.10), as pure decisions: what a loop-controller decides (``continue`` or ``break``),
how its iterations and generations are counted, when its body is busy (a loop-back arrival is then held),
and how a ``continue`` resets the body. ``lifecycle.RunTxn`` reads the values and writes what these decide."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..blueprint import BREAK, CONTINUE, EdgeDef
from ..errors import ExpressionEvalError
from ..expressions import Expression
from .routing import condition_holds, select_edges
from .state import ACTIVE_NODE, Arrival, JobKind, NodeRecord, NodeStatus, evolve


@dataclass(slots=True)
class LoopDecision:
    """A loop-controller's decision: its action, the edges taken among those ``considered`` (a ``continue``
    considers only its continue edges: it skips nothing), and whether ``maxIterations`` ended the loop."""

    action: str
    chosen: list[EdgeDef]
    considered: list[EdgeDef]
    capped: bool
    errors: list[str]


def decide_loop(edges: list[EdgeDef], condition: Expression | None, scope: dict[str, Any], iteration: int,
                max_iterations: int) -> LoopDecision:
    """``continue`` (a new iteration of the body) while ``condition`` holds and fewer than ``max_iterations``
    iterations ran, and some continue edge's condition holds; else ``break``. An exit edge whose own
    condition holds breaks the loop first. ``scope["result"]`` is set to the decided action (for transforms)."""
    cont = [e for e in edges if e.action == CONTINUE]
    exits = [e for e in edges if e.action != CONTINUE]
    errors: list[str] = []
    forced = [e for e in exits if e.condition is not None and condition_holds(e, scope, errors)]
    capped = False
    chosen: list[EdgeDef] = []
    if forced:
        action, chosen = BREAK, forced
    elif _loop_condition_holds(condition, scope, errors) and iteration < max_iterations:
        action = CONTINUE
        chosen = select_edges(cont, CONTINUE, scope, errors)
        if not chosen:
            action = BREAK
    else:
        capped = iteration >= max_iterations
        action = BREAK
    if action == BREAK and not forced:
        scope["result"] = {"output": None, "action": BREAK}
        chosen = select_edges(exits, BREAK, scope, errors)
    scope["result"] = {"output": None, "action": action}
    considered = list(cont) if action == CONTINUE else list(edges)
    return LoopDecision(action, chosen, considered, capped, errors)


def _loop_condition_holds(condition: Expression | None, scope: dict[str, Any], errors: list[str]) -> bool:
    if condition is None:
        return True
    try:
        return bool(condition.evaluate(scope))
    except ExpressionEvalError as err:
        errors.append(f"loop condition {condition.source!r}: {err}")
        return False


def fired(rec: NodeRecord | None, *, is_controller: bool, loop_entry: bool, now_ms: int) -> NodeRecord:
    """A node's record once fired: a new firing (seq + 1) in its current generation, attempt 1. A
    loop-controller keeps its busy count, and its iteration count unless entered anew."""
    gen = rec.gen if rec else 0
    new = NodeRecord(status=NodeStatus.QUEUED, seq=(rec.seq if rec else 0) + 1, gen=gen, fired_gen=gen,
                     attempt=1, phase=JobKind.EXEC, queued_at=now_ms, runs=rec.runs if rec else 0)
    if is_controller:
        new.iter = 0 if (loop_entry or not rec) else (rec.iter or 0)
        new.busy = (rec.busy or 0) if rec else 0
    return new


def with_busy(controller: NodeRecord | None, delta: int) -> NodeRecord:
    """A loop-controller's count of body nodes fired and not yet finished, moved by ``delta``."""
    rec = controller or NodeRecord(status=NodeStatus.PENDING, seq=0, runs=0, gen=0)
    return evolve(rec, busy=max(0, (rec.busy or 0) + delta))


def body_busy(controller: NodeRecord | None, inner_controllers: Iterable[NodeRecord]) -> bool:
    """A body node still running, or an inner loop whose own next iteration is waiting, keeps it busy."""
    if controller is not None and (controller.busy or 0) > 0:
        return True
    return any(r.held for r in inner_controllers)


def next_generation(rec: NodeRecord | None) -> NodeRecord | None:
    """A body node's record after a ``continue``: pending in the next generation. None for a node still
    active (cannot happen through the loop-back, which waits for an idle body): it is left alone."""
    if rec is not None and rec.status in ACTIVE_NODE:
        return None
    base = rec or NodeRecord(seq=0, runs=0, fired_gen=-1)
    return evolve(base, gen=base.gen + 1, status=NodeStatus.PENDING, held=None)


def carried_arrivals(outside: list[str], old: Mapping[str, Arrival]) -> tuple[dict[str, Arrival], tuple[int, int]]:
    """The arrivals from outside the loop body that carry over into the body's next generation (they
    happened once, before the loop), and the join count they make."""
    kept = {p: old[p] for p in outside if p in old}
    return kept, (len(kept), sum(int(a.taken) for a in kept.values()))
