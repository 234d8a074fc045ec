"""The ``sleep`` built-in: a durable sleep, ended by a ``wake`` job; the run's keys outlive the wake-up."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...jobs import Job
from ...loading import parse_duration_ms
from ..lifecycle import RunTxn
from ..reads import read_node_input
from ..state import NodeRecord, NodeStatus, evolve, fetch_node, write_node

if TYPE_CHECKING:
    from ..step import Step


async def run_sleep(step: Step, rec: NodeRecord, node_input: Any) -> list[tuple[str, Job]]:
    try:
        duration = parse_duration_ms(step.node.params.get("duration"))
    except ValueError as e:
        error = str(e)
        return await step.commit(lambda run, r: run.fail_node(step.node, r, step.job, error, True))
    wake_at = step.engine.clock() + duration

    async def fn(run: RunTxn, r: NodeRecord) -> None:
        write_node(run.t, step.node.id, evolve(r, status=NodeStatus.SLEEPING, wake_at=wake_at))
        keep_until = max(wake_at, (await run.meta()).keep_until or 0)
        run.set_meta(keep_until=keep_until)
        run.extend_expiry(keep_until)
        run.schedule(Job(step.run_id, step.node.id, step.job.seq, "wake", 1, not_before_ms=wake_at))

    return await step.commit(fn)


async def run_wake(step: Step) -> list[tuple[str, Job]]:
    r = await fetch_node(step.engine.store, step.run_id, step.node.id)
    if r is None or r.seq != step.job.seq or r.status != NodeStatus.SLEEPING:
        step.stale = True
        return []
    node_input = await read_node_input(step.engine.store, step.bp, step.node, step.run_id)
    return await step.succeed(node_input, None, {}, node_input, token=r.token, status=NodeStatus.SLEEPING)
