"""The loop-controller built-in: ``continue`` (a new iteration of the body) or ``break``, decided by
``loops.decide_loop`` over a scope read before the commit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...blueprint import CONTINUE
from ...jobs import Job
from ...loading import loop_condition
from ..lifecycle import RunTxn
from ..loops import decide_loop
from ..reads import read_scope
from ..routing import aggregate, expression_names
from ..state import NodeRecord, evolve

if TYPE_CHECKING:
    from ..step import Step


async def run_loop(step: Step, rec: NodeRecord, node_input: Any) -> list[tuple[str, Job]]:
    """loop-controller: ``continue`` while ``params.condition`` holds and fewer than ``params.maxIterations``
    iterations ran; else ``break``. An exit edge whose own condition holds breaks the loop first."""
    node = step.node
    edges = list(step.bp.out_edges[node.id])
    cond = loop_condition(node)
    names = set(cond.names if cond else ()) | expression_names(edges)
    base = {"result": {"output": None, "action": None}, "input": node_input}
    scope = await read_scope(step.engine.store, step.run_id, names, base, {})
    iteration = int(rec.iter or 0)
    decision = decide_loop(edges, cond, scope, iteration, int(node.params.get("maxIterations", 1000)))
    action = decision.action
    route = aggregate(decision.considered, decision.chosen, scope, None, decision.errors, node.id, step.run_id)
    if action == CONTINUE:
        route.decisions = [d for d in route.decisions if d.taken]  # a continue skips nothing

    async def fn(run: RunTxn, r: NodeRecord) -> None:
        if action == CONTINUE:
            await run.reset_loop_body(node.id)
        elif decision.capped:
            run.t.event({"type": "loop_max_iterations", "ts": step.engine.clock(), "node": node.id,
                         "iterations": iteration})
        counted = evolve(r, iter=iteration + 1 if action == CONTINUE else iteration)
        await run.complete(node, counted, None, action, route, {})

    return await step.commit(fn)
