"""The ``wait`` built-in: the node, and so the run, awaits a resume."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...jobs import Job
from ...store import NODES
from ..lifecycle import RunTxn
from ..state import NodeStatus

if TYPE_CHECKING:
    from ..step import Step


async def run_wait(step: Step) -> list[tuple[str, Job]]:
    async def fn(run: RunTxn, rec: dict[str, Any]) -> None:
        m = await run.meta()
        run.t.put(NODES, step.node.id, {**rec, "status": NodeStatus.AWAITING.value, "token": step.token})
        run.set_meta("awaiting_nodes", [*(m["awaiting_nodes"] or []), step.node.id])
        run.add_pending(-1)
        run.t.event({"type": "node_awaiting", "ts": step.engine.clock(), "node": step.node.id})

    return await step.commit(fn)
