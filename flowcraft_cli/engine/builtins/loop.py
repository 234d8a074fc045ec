"""The loop-controller built-in: ``continue`` (a new iteration of the body) or ``break``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...blueprint import BREAK, CONTINUE
from ...errors import ExpressionEvalError
from ...expressions import Expression
from ...jobs import Job
from ...loader import loop_condition
from ..lifecycle import RunTxn
from ..reads import read_scope
from ..routing import aggregate

if TYPE_CHECKING:
    from ..step import Step


async def run_loop(step: Step, rec: dict[str, Any], node_input: Any) -> list[tuple[str, Job]]:
    """loop-controller: ``continue`` (a new iteration of the body) while ``params.condition`` holds and
    fewer than ``params.maxIterations`` iterations ran; else ``break``. An exit edge whose own
    condition holds breaks the loop first."""
    node = step.node
    edges = step.bp.out_edges[node.id]
    cont = [e for e in edges if e.action == CONTINUE]
    exits = [e for e in edges if e.action != CONTINUE]
    cond = loop_condition(node)
    names = set(cond.names if cond else ())
    for e in edges:
        for expr in (e.condition, e.transform):
            if expr is not None:
                names |= set(expr.names)
    base = {"result": {"output": None, "action": None}, "input": node_input}
    scope = await read_scope(step.engine.store, step.run_id, names, base, {})
    events: list[str] = []
    iteration = int(rec.get("iter", 0))
    max_iter = int(node.params.get("maxIterations", 1000))

    def holds(expr: Expression | None, what: str) -> bool:
        if expr is None:
            return True
        try:
            return bool(expr.evaluate(scope))
        except ExpressionEvalError as err:
            events.append(f"{what} {expr.source!r}: {err}")
            return False

    forced = [e for e in exits if e.condition is not None and holds(e.condition, f"edge {node.id}->{e.target} condition")]
    capped = False
    if forced:
        action, chosen = BREAK, forced
    elif holds(cond, "loop condition") and iteration < max_iter:
        action = CONTINUE
        chosen = [e for e in cont if holds(e.condition, f"edge {node.id}->{e.target} condition")]
        if not chosen:
            action = BREAK
    else:
        capped = iteration >= max_iter
        action = BREAK
    if action == BREAK and not forced:
        scope["result"] = {"output": None, "action": BREAK}
        chosen = [e for e in exits if e.action == BREAK and holds(e.condition, f"edge {node.id}->{e.target} condition")]
        if not chosen:
            chosen = [e for e in exits if e.action is None and holds(e.condition, f"edge {node.id}->{e.target} condition")]
    scope["result"] = {"output": None, "action": action}
    considered = list(cont) if action == CONTINUE else list(edges)
    route = aggregate(considered, chosen, scope, None, events, node.id, step.run_id)
    if action == CONTINUE:
        route.decisions = [d for d in route.decisions if d.taken]  # a continue skips nothing

    async def fn(run: RunTxn, r: dict[str, Any]) -> None:
        if action == CONTINUE:
            await run.reset_loop_body(node.id)
        elif capped:
            run.t.event({"type": "loop_max_iterations", "ts": step.engine.clock(), "node": node.id,
                         "iterations": iteration})
        extra = {"iter": iteration + 1 if action == CONTINUE else iteration}
        await run.complete(node, {**r, **extra}, None, action, route, {})

    return await step.commit(fn)
