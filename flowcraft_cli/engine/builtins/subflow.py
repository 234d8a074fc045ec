"""The ``subflow`` built-in: a child run linked to the node; its end (or its wait) comes back as a job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...blueprint import NodeDef
from ...errors import InvalidInput
from ...ids import child_run_id
from ...jobs import Job
from ...store import MISSING, OUTBOX, STATE
from ..lifecycle import RunTxn
from ..reads import read_node_input
from ..state import JobKind, NodeRecord, NodeStatus, ParentRef, RunStatus, evolve, fetch_node, write_node

if TYPE_CHECKING:
    from ..step import Step


async def run_subflow(step: Step, rec: NodeRecord, runner: NodeDef, node_input: Any) -> list[tuple[str, Job]]:
    """subflow: a child run linked to this node; the child's end schedules a ``child`` job here."""
    params = runner.params
    child_bp = str(params.get("blueprintId"))
    child_id = child_run_id(step.run_id, step.node.id, step.job.seq, step.job.attempt)
    mapping = params.get("inputs")
    seed: dict[str, Any] | None = None
    if isinstance(mapping, Mapping):
        seed = {}
        for child_key, parent_key in mapping.items():
            ctx_v, out_v = await step.engine.store.read(step.run_id, STATE, [str(parent_key), f"_outputs.{parent_key}"])
            seed[child_key] = ctx_v if ctx_v is not MISSING else (None if out_v is MISSING else out_v)
    child_input = seed if seed is not None else node_input
    scheduled: list[tuple[str, Job]] = []
    if not step.resumed:
        async def fn(run: RunTxn, r: NodeRecord) -> None:
            write_node(run.t, step.node.id, evolve(r, child=child_id))
        scheduled = await step.commit(fn, unlist=False)  # listed until the child run exists
        if step.stale:  # the node moved on (duplicate delivery, or the run finished): start no child
            return []
    parent = ParentRef(step.run_id, step.node.id, step.job.seq, step.job.attempt)
    try:
        _, jobs = await step.engine.start_run(child_bp, child_input, run_id=child_id, parent=parent, seed=seed)
        if not jobs and step.resumed:
            # driven on after a crash: the child may exist with its start jobs still in its outbox
            jobs = [(child_id, Job.from_dict(d)) for d in (await step.engine.store.read_all(child_id, OUTBOX)).values()]
    except InvalidInput as e:
        error = str(e)
        token = rec.token if step.resumed else None
        return scheduled + await step.commit(
            lambda run, r: run.fail_node(step.node, r, step.job, error, True), token=token)
    return scheduled + jobs


async def _child_awaits(step: Step, rec: NodeRecord, child_id: str) -> list[tuple[str, Job]]:
    """The child run rests awaiting: this node awaits too, so the parent run can rest; a resume of this
    node is passed on to the child."""
    async def fn(run: RunTxn, r: NodeRecord) -> None:
        m = await run.meta()
        write_node(run.t, step.node.id, evolve(r, status=NodeStatus.AWAITING))
        run.set_meta(awaiting_nodes=[*m.awaiting_nodes, step.node.id])
        run.add_pending(-1)
        run.t.event({"type": "node_awaiting", "ts": step.engine.clock(), "node": step.node.id,
                     "child": child_id})

    scheduled = await step.commit(fn, token=rec.token)
    if await step.engine.store.read_status(child_id) is not None:
        # the child ended meanwhile (resumed directly): wake this node and finish it now
        return scheduled + await run_child(step)
    return scheduled


async def run_child(step: Step) -> list[tuple[str, Job]]:
    r = await fetch_node(step.engine.store, step.run_id, step.node.id)
    if r is None or r.seq != step.job.seq or not r.child or r.status not in (NodeStatus.RUNNING, NodeStatus.AWAITING):
        step.stale = True
        return []
    child_id = r.child
    status = await step.engine.store.read_status(child_id)
    if status is None:
        child_meta = await step.engine.find_meta(child_id)
        if child_meta and child_meta.status == RunStatus.AWAITING and r.status == NodeStatus.RUNNING:
            return await _child_awaits(step, r, child_id)
        return []
    if r.status == NodeStatus.AWAITING:
        # the child was resumed directly and has ended: this node is busy again until it settles below
        async def wake(run: RunTxn, rr: NodeRecord) -> None:
            m = await run.meta()
            write_node(run.t, step.node.id, evolve(rr, status=NodeStatus.RUNNING))
            run.set_meta(awaiting_nodes=[n for n in m.awaiting_nodes if n != step.node.id])
            run.add_pending(1)

        await step.commit(wake, token=r.token, status=NodeStatus.AWAITING)
        r = evolve(r, status=NodeStatus.RUNNING)
    phase = r.current_phase
    runner = step.node if phase == JobKind.EXEC else step.bp.node_map[step.node.config.fallback or ""]
    job = Job(step.run_id, step.node.id, step.job.seq, phase.value, r.attempt or 0)
    if status["status"] != RunStatus.COMPLETED:
        msg = f"subflow {runner.params.get('blueprintId')!r} (run {child_id}) {status['status']}: {status.get('reason')}"
        return await step.commit(lambda run, rr: run.fail_node(step.node, rr, job, msg, False), token=r.token)
    child_ctx = await step.engine.store.read_all(child_id, STATE)
    outputs = runner.params.get("outputs")
    writes: dict[str, Any] = {}
    if isinstance(outputs, Mapping):
        for parent_key, child_node in outputs.items():
            v = child_ctx.get(f"_outputs.{child_node}", child_ctx.get(str(child_node)))
            writes[str(parent_key)] = v
        output: Any = child_ctx
    else:
        child_bp = step.engine.blueprints[str(runner.params.get("blueprintId"))]
        done = {t: child_ctx[f"_outputs.{t}"] for t in child_bp.terminal_nodes if f"_outputs.{t}" in child_ctx}
        output = next(iter(done.values())) if len(done) == 1 else done
    node_input = await read_node_input(step.engine.store, step.bp, step.node, step.run_id)
    if runner is not step.node:
        return await step.succeed(output, None, writes, node_input, runner, token=r.token)
    return await step.succeed(output, None, writes, node_input, token=r.token)
