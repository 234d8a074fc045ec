"""The ``batch`` built-in: one job per item, each claimed and committed on its own, then a ``gather``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import NodeFailure, json_type
from ...jobs import Job
from ...node_api import _MISSING
from ...store import BATCH, MISSING, STATE
from ..lifecycle import RunTxn
from ..reads import read_node_input
from ..state import (
    BatchItem,
    ItemStatus,
    JobKind,
    NodeRecord,
    NodeStatus,
    batch_done_field,
    batch_input_field,
    batch_result_field,
    batch_size_field,
    evolve,
    fetch_node,
    read_item,
    read_node,
    write_item,
    write_node,
)
from .function import call_node

if TYPE_CHECKING:
    from ..step import Step


async def run_batch(step: Step, rec: NodeRecord, node_input: Any) -> list[tuple[str, Job]]:
    """batch: one job per item of the input list (``params.worker`` runs each); the output is the list
    of results in item order."""
    if step.resumed:
        step.stale = True
        return []  # already expanded; its items are under way
    if node_input is None:
        node_input = []
    if not isinstance(node_input, list):
        msg = f"batch input must be a list, got {json_type(node_input)}"
        return await step.commit(lambda run, r: run.fail_node(step.node, r, step.job, msg, False))
    if not node_input:
        return await step.succeed([], None, {}, node_input)
    seq = step.job.seq

    async def fn(run: RunTxn, r: NodeRecord) -> None:
        write_node(run.t, step.node.id, evolve(r, items=len(node_input)))
        run.t.put(BATCH, batch_size_field(step.node.id, seq), len(node_input))
        run.t.put(BATCH, batch_done_field(step.node.id, seq), 0)
        for i, item in enumerate(node_input):
            run.t.put(BATCH, batch_input_field(step.node.id, seq, i), item)
            write_item(run.t, step.node.id, seq, i, BatchItem(ItemStatus.QUEUED, 1))
            run.schedule(Job(step.run_id, step.node.id, seq, "item", 1, item=i))

    return await step.commit(fn)


async def run_item(step: Step) -> list[tuple[str, Job]]:
    job, node = step.job, step.node
    now = step.engine.clock()

    async def claim(run: RunTxn) -> tuple[Any, str | None] | None:
        step.held_elsewhere = False  # (a decision taken again on fresh values starts over)
        rec = await read_node(run.t, node.id)
        if rec is None or rec.seq != job.seq or rec.status != NodeStatus.RUNNING or rec.phase != JobKind.EXEC:
            return None
        st = await read_item(run.t, node.id, job.seq, job.item)
        if st is None or st.attempt != job.attempt or (st.recovery or 0) != job.recovery:
            return None
        if st.status == ItemStatus.RUNNING and await step.engine.claim_is_held(st):
            step.held_elsewhere = True
            return None
        if st.status not in (ItemStatus.QUEUED, ItemStatus.RUNNING):
            return None
        if st.status == ItemStatus.RUNNING and st.worker and st.worker != step.engine.worker_id:
            # arq handed on the job of a worker that died holding this item: that attempt was lost
            st, failed = await run.lose_item(node, rec, st, job, st.worker)
            if failed:
                await run.settle()
                return None
        write_item(run.t, node.id, job.seq, job.item, evolve(
            st, status=ItemStatus.RUNNING, token=step.token, worker=step.engine.worker_id, job=job.job_id,
            attempt_started_at=now))
        step.list_step(run)
        return await run.t.get(BATCH, batch_input_field(node.id, job.seq, job.item)), rec.token

    got = await step.txn(claim)
    if got is None or got[0] is None:
        step.stale = not step.held_elsewhere
        return []
    step.claimed = True
    item, node_token = got[0]
    worker = str(node.params.get("worker"))
    try:
        output, _action, writes = await call_node(step, node, item, job.attempt, uses=worker,
                                                   extra={"item_index": job.item})
    except NodeFailure as e:
        error, fatal, tb = str(e), e.fatal, e.traceback
        step.log_failure(error, tb)

        async def failed(run: RunTxn) -> bool:
            rec = await read_node(run.t, node.id)
            st = await read_item(run.t, node.id, job.seq, job.item)
            if rec is None or rec.token != node_token or st is None or st.token != step.token:
                return False
            step.unlist_step(run)
            if not fatal and job.attempt < node.config.max_retries:
                delay = node.config.retry_delay_ms * (2 ** (job.attempt - 1))
                write_item(run.t, node.id, job.seq, job.item,
                           BatchItem(ItemStatus.QUEUED, job.attempt + 1, error=error))
                run.t.event({"type": "attempt_failed", "ts": now, "node": node.id, "item": job.item,
                             "attempt": job.attempt, "error": error, "worker": step.engine.worker_id,
                             "started_at": st.attempt_started_at, **({"traceback": tb} if tb else {})})
                run.schedule(Job(step.run_id, node.id, job.seq, "item", job.attempt + 1, item=job.item,
                                 not_before_ms=step.engine.clock() + delay))
            else:
                write_item(run.t, node.id, job.seq, job.item, BatchItem(ItemStatus.FAILED, job.attempt, error=error))
                await run.fail_node(node, rec, Job(step.run_id, node.id, job.seq, "exec", node.config.max_retries),
                                    f"item {job.item}: {error}", False, tb=tb)
            await run.settle()
            return True

        res = await step.txn(failed)
        if res and res[0]:
            step.listed = False
        return res[1] if res and res[0] else []

    async def done(run: RunTxn) -> bool:
        rec = await read_node(run.t, node.id)
        st = await read_item(run.t, node.id, job.seq, job.item)
        if rec is None or rec.token != node_token or st is None or st.token != step.token:
            return False
        step.unlist_step(run)
        for key, value in writes.items():
            if value is _MISSING:
                run.t.delete(STATE, key)
            else:
                run.t.put(STATE, key, value)
        write_item(run.t, node.id, job.seq, job.item, BatchItem(ItemStatus.DONE, job.attempt))
        run.t.put(BATCH, batch_result_field(node.id, job.seq, job.item), output)
        n_done = await run.t.get(BATCH, batch_done_field(node.id, job.seq), 0) + 1
        run.t.put(BATCH, batch_done_field(node.id, job.seq), n_done)
        if n_done >= await run.t.get(BATCH, batch_size_field(node.id, job.seq), 0):
            run.schedule(Job(step.run_id, node.id, job.seq, "gather", 1))
        return True

    res = await step.txn(done)
    if res and res[0]:
        step.listed = False
    return res[1] if res and res[0] else []


async def run_gather(step: Step) -> list[tuple[str, Job]]:
    node, seq = step.node, step.job.seq
    rec = await fetch_node(step.engine.store, step.run_id, node.id)
    if rec is None or rec.seq != step.job.seq or rec.status != NodeStatus.RUNNING:
        step.stale = True
        return []
    n = (await step.engine.store.read(step.run_id, BATCH, [batch_size_field(node.id, seq)]))[0]
    results = await step.engine.store.read(step.run_id, BATCH, [batch_result_field(node.id, seq, i)
                                                                for i in range(n)])
    if any(r is MISSING for r in results):
        step.stale = True
        return []
    node_input = await read_node_input(step.engine.store, step.bp, node, step.run_id)
    return await step.succeed(list(results), None, {}, node_input, token=rec.token)
