"""The ``wait`` built-in: the node, and so the run, awaits a resume (``Engine.resume``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...jobs import Job
from ..lifecycle import RunTxn
from ..state import NodeRecord, NodeStatus, evolve, write_node

if TYPE_CHECKING:
    from ..step import Step


async def run_wait(step: Step) -> list[tuple[str, Job]]:
    async def fn(run: RunTxn, rec: NodeRecord) -> None:
        m = await run.meta()
        write_node(run.t, step.node.id, evolve(rec, status=NodeStatus.AWAITING, token=step.token))
        run.set_meta(awaiting_nodes=[*m.awaiting_nodes, step.node.id])
        run.add_pending(-1)
        run.t.event({"type": "node_awaiting", "ts": step.engine.clock(), "node": step.node.id})

    return await step.commit(fn)
