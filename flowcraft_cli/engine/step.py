"""One job handled: claim the node's step (or batch item) in a transaction, do the work outside any
transaction (``builtins``), then commit the outcome in one transaction, fenced by the claim's token."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..blueprint import BUILTINS, Blueprint, NodeDef
from ..errors import NodeFailure, UndecodableValue
from ..ids import claim_token
from ..jobs import Job, Picked
from ..store import MISSING, NODES, RUN, STATE, Txn
from . import ahead
from .builtins import batch, function, loop, sleep, subflow, wait
from .lifecycle import RunTxn
from .reads import input_fields, node_input_from, prefetch_commit, read_node_input, read_route, warm_run
from .routing import Route
from .state import (
    DEFER_FIELDS,
    FINAL_STATUSES,
    META_FIELDS,
    InlineStep,
    ItemStatus,
    JobKind,
    NodeRecord,
    NodeStatus,
    RunStatus,
    evolve,
    read_item,
    read_node,
    write_item,
    write_node,
)

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("flowcraft.engine")
# a node whose claim was deferred (Engine.defer_claims) and still runs after this long is claimed while it runs:
# from then on it shows as running, and its attempt is recorded as lost should its worker die
LATE_CLAIM_S = 0.02


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Step:
    """Handling of one job: claim, work, commit."""

    def __init__(self, engine: Engine, bp: Blueprint, node: NodeDef, job: Job,
                 inline: InlineStep | None = None, *, first: bool = False,
                 reread: frozenset[tuple[str, str]] = frozenset(), more: list[InlineStep] | None = None) -> None:
        self.engine = engine
        self.bp = bp
        self.node = node
        self.job = job
        self.run_id = job.run_id
        self.token = inline.token if inline is not None else claim_token()
        self.born = time.monotonic()  # when its job reached this step (a lease that lapsed since: engine.ahead)
        # its queue job's first delivery (one delivered again may have killed a worker): it may run its node before
        # claiming it (``defer``), and run its successors ahead of its commit (engine.ahead)
        self.fresh = first and inline is None
        self.reread = reread  # (kind, field) pairs read anew as its job was taken (Engine.handle)
        self.claimed_at = 0  # when its claim was taken (or, deferred, when its node started)
        self.held_elsewhere = False  # set when a live step of another delivery holds the node
        self.stale = False  # set when the node no longer expects this step (duplicate or late delivery)
        self.claimed = False  # this step took the node's claim (its commit must still find its token)
        self.listed = False  # listed under this worker by its claim, and not unlisted by a commit yet
        self.failure: str | None = None  # the error, when the attempt this step ran failed
        self.resumed = False  # its claim took over a child run or batch already under way
        self.node_input: Any = None  # the node's input, read by its claim
        self.preclaimed = inline  # claimed for this worker by its predecessor's commit (runs without a claim)
        self.list_as = inline.list_as if inline else job.job_id  # its entry in this worker's list of steps
        # the successor this step's commit claimed for this worker, to run next (engine.inline_steps)
        self.inline: list[InlineStep] = []
        # steps claimed for this worker with this one (``Engine.sibling_claims``), not run yet: it may run some of
        # them after its own node and commit them with it (engine.ahead.succeed_siblings), and takes those out
        self.more: list[InlineStep] = more if more is not None else []
        self._last_txn: Txn | None = None
        self.picked: Picked | None = None  # the queue job its commit took for this worker (pick_ms)
        # a commit of this step took its own queue job out of the queue (finished a job this worker took, or
        # dropped one arq handed over): the job's worker must not hand it back to arq (ArqAdapter.step)
        self.left_queue = False
        self.unqueued: list[str] = []  # queued jobs its commit claimed for this worker (``Txn.unqueue``)
        # the run, as a transaction of this step found it, is not of this step's blueprint (what the process
        # remembered of it was another run's of the same id): the step is handled again on fresh values
        self.other_blueprint = False
        # the node's record as found queued, when its claim goes with its commit (``Engine.defer_claims``): the
        # node runs first, and the commit claims and completes it at once if the record is still that one
        self.deferred: NodeRecord | None = None
        self.redo = False  # a deferred claim's input changed before its commit: handle the job again, claimed
        self._late: asyncio.Future[None] | None = None  # the claim taken while a deferred node runs long
        self._late_pause: asyncio.Future[None] | None = None  # its wait before trying again, after a Redis error
        self._node_done = False  # the node has returned (or raised, or its step was cancelled)
        # a node this step ran waited for something (I/O, a sleep, a thread) rather than ending in its first step:
        # its commit then claims one queued sibling, not several (Engine.sibling_claims), so that branches that
        # wait are spread over the free slots and not queued behind each other in this one
        self.waited = False

    @property
    def defer(self) -> bool:
        """May its claim go with its commit (``Engine.defer_claims``, a first delivery)?"""
        return self.fresh and self.engine.defer_claims

    async def txn(self, fn: Callable[[RunTxn], Any], reads: dict[str, list[str]] | None = None, *,
                  inline: bool = False) -> Any:
        """Run ``fn`` in a transaction on the run, unless the run has finished. ``reads``: fields (kind ->
        fields) ``fn`` will read, fetched with the run's meta in one go. ``inline``: the commit may claim a
        successor it fires for this worker (``self.inline``)."""
        async def wrapped(t: Txn) -> Any:
            await t.prefetch({RUN: list(META_FIELDS), NODES: [self.node.id], **(reads or {})})
            run = RunTxn(self.engine, t, self.bp)
            self.inline = []
            meta = await run.meta()
            self.other_blueprint = meta.blueprint_id != self.bp.id or meta.blueprint_version != self.bp.version
            if meta.status in FINAL_STATUSES or self.other_blueprint:
                return None
            if meta.version_wait_since is not None:
                run.set_meta(version_wait_since=None)  # a worker with the run's version is here: the grace restarts
            if inline:
                run.inline_as = self.list_as
            result = await fn(run)
            self.inline = run.inline
            if inline and result:
                if self.list_as in self.engine.taken_jobs:  # a job this worker took: finished in this commit
                    t.finish_job = self.list_as
                elif run.inline and self.preclaimed is None:
                    # the job arq handed over is done once its step hands the slot on (the successor is listed
                    # under it in this commit): out of the queue now, or every look at the queue until the
                    # chain ends finds it (locked) and pays a WATCH/EXISTS/ZSCORE round to learn so. arq's
                    # own finish, when the chain ends, finds nothing left to remove but its lock
                    t.unqueue.append(self.list_as)
                if not run.inline and self.engine.pick_ms:
                    t.pick_ms = self.engine.pick_ms  # nothing to run next here: take the queue's next job
            self._last_txn = t
            return (result, run.scheduled)
        return await self.engine.store.transact(self.run_id, wrapped)

    async def run(self) -> list[tuple[str, Job]]:
        self.engine.active_tokens.add(self.token)
        try:
            return await self._dispatch()
        except asyncio.CancelledError:
            # shutdown, lost Redis, or the queue's own timeout (only if the event loop was blocked past the
            # engine's attempt cap): hand the step back; a redelivered job claims it at once, and a job the
            # queue gave up on is queued again by the reconciler
            await asyncio.shield(self._release())
            raise
        except UndecodableValue as e:
            return await self._fail_undecodable(e)
        finally:
            self.engine.active_tokens.discard(self.token)

    async def _fail_undecodable(self, error: UndecodableValue) -> list[tuple[str, Job]]:
        """A value in the run's hash is not JSON (CONTRACT §6.1): every retry would meet it again, so the run
        fails now. If even that cannot be written (the run's own records are corrupt), the job is dropped."""
        log.error("job %s: %s; failing the run", self.job.job_id, error)

        async def fn(run: RunTxn) -> None:
            run.set_meta(failed_node=self.node.id)
            await run.finalize(RunStatus.FAILED, f"node {self.node.id!r}: {error}")

        try:
            got = await self.txn(fn)
        except UndecodableValue as again:
            log.error("job %s: cannot fail run %s either (%s); dropped", self.job.job_id, self.run_id, again)
            return []
        return got[1] if got else []

    async def _release(self) -> None:
        job = self.job
        try:
            await self._late_claimed()
        except BaseException:
            pass
        if self.deferred is not None:
            return  # nothing claimed (a late claim whose reply was lost is recovered from the list of steps)

        async def fn(run: RunTxn) -> bool:
            if job.kind == JobKind.ITEM:
                st = await read_item(run.t, self.node.id, job.seq, job.item)
                if st is not None and st.token == self.token and st.status == ItemStatus.RUNNING:
                    write_item(run.t, self.node.id, job.seq, job.item,
                               evolve(st, status=ItemStatus.QUEUED, token=None, job=None))
                    self.unlist_step(run)
                    return True
                return False
            rec = await read_node(run.t, self.node.id)
            if rec is not None and rec.token == self.token and rec.status == NodeStatus.RUNNING \
                    and not rec.child and rec.items is None:
                write_node(run.t, self.node.id, evolve(rec, status=NodeStatus.QUEUED, token=None, job=None))
                self.unlist_step(run)
                if self.preclaimed is not None:
                    run.schedule(job)  # claimed inline, it has no queue job of its own to be handed back to
                return True
            return False

        try:
            got = await self.txn(fn)
            if got is not None and got[0]:
                self.listed = False
        except Exception:  # Redis gone too: the claim is no longer held here, so the step is recovered
            log.warning("job %s: could not hand back its claim; it is recovered once this worker's heartbeat "
                        "(or the reconciler) sees it is no longer running here", job.job_id)

    async def _dispatch(self) -> list[tuple[str, Job]]:
        kind = self.job.kind
        if kind in (JobKind.EXEC, JobKind.FALLBACK):
            return await self._run_exec()
        if kind == JobKind.ITEM:
            return await batch.run_item(self)
        if kind == JobKind.GATHER:
            return await batch.run_gather(self)
        if kind == JobKind.WAKE:
            return await sleep.run_wake(self)
        if kind in (JobKind.CHILD, JobKind.CHILD_WAIT):
            return await subflow.run_child(self)
        return []

    # ---- claim

    async def claim(self) -> NodeRecord | None:
        """Take the node's claim for this step: the record as claimed, or None (stale, held elsewhere, run
        finished). A step whose child run or batch is already under way is taken over (``resumed``)."""
        job = self.job
        self.claimed_at = self.engine.clock()
        if self.preclaimed is not None:  # its predecessor's commit claimed it for this worker
            self.claimed = self.listed = True
            self.node_input = self.preclaimed.node_input
            if self.engine.on_claim is not None and self.preclaimed.running is None:  # (ahead: counted as it began)
                self.engine.on_claim(self.bp.id, job)
            return self.preclaimed.record
        # (a step recovered once, recovery > 0, claims first too: its node may be one that kills its worker; and
        # so does a node with ``inputs``, whose input other steps may change while it is queued)
        if self.defer and job.kind == JobKind.EXEC and not job.recovery and self.node.uses not in BUILTINS \
                and self.node.inputs is None:
            got = await self._defer_claim()
            if got is not None:
                return got

        async def fn(run: RunTxn) -> tuple[NodeRecord, bool] | None:
            self.held_elsewhere = False  # (a decision taken again on fresh values starts over)
            warm_run(run.t, self.bp)  # what the commit will read comes back with the claim
            rec = await read_node(run.t, self.node.id)
            if rec is None or not self._for_this_job(rec):
                return None
            if rec.status == NodeStatus.RUNNING:
                if await self.engine.claim_is_held(rec):
                    self.held_elsewhere = True
                    return None
                if rec.child or rec.items is not None:
                    # its child run / batch is already under way: take the claim over and drive it on
                    write_node(run.t, self.node.id, evolve(rec, worker=self.engine.worker_id, job=job.job_id))
                    self.list_step(run)
                    return rec, True
                if rec.worker and rec.worker != self.engine.worker_id:
                    # arq handed on the job of a worker that died holding it: that attempt was lost
                    rec, failed = await run.lose_attempt(self.node, rec, job, rec.worker)
                    if failed:
                        await run.settle()
                        return None
            elif rec.status != NodeStatus.QUEUED:
                return None
            new = self._as_claimed(rec)
            write_node(run.t, self.node.id, new)
            self.list_step(run)
            # the input, read in the claim's transaction: checked with the claim, so it is the input of
            # exactly the firing this step claims (a later firing rewrites it)
            self.node_input = node_input_from(self.node, await run.t.get_many(STATE, fields))
            return new, False

        fields = input_fields(self.node)
        got = await self.txn(fn, {STATE: fields})
        if got is None or got[0] is None:
            self.stale = not self.held_elsewhere and got is not None
            log.debug("job %s: not claimable (duplicate, stale, held elsewhere or run finished)", job.job_id)
            return None
        claimed, self.resumed = got[0]
        self.claimed = not self.resumed
        if self.claimed and self.engine.on_claim is not None:
            self.engine.on_claim(self.bp.id, job)
        return claimed

    async def _defer_claim(self) -> NodeRecord | None:
        """The record as the store holds it (read anew as the job was taken or handed over, ``reread``: what
        this process remembers may be another run's of the same id), when it is queued for this very job: the
        node runs without a claim of its own, and its commit claims and completes it in one transaction
        (checking it is still that record, with the same input). None: claim as usual. The node's input is
        written with its record's firing (``_inputs.<node>``, RunTxn.fire), so a record that is still the same
        firing at the commit ran on the right input."""
        job, store, fields = self.job, self.engine.store, input_fields(self.node)
        wanted = {RUN: list(DEFER_FIELDS), NODES: [self.node.id], STATE: fields}
        if not self.reread.issuperset((kind, f) for kind, names in wanted.items() for f in names):
            return None  # not read anew: claim first
        # the run as Redis holds it: running, of this step's blueprint (a run id used again after the run expired
        # may be another blueprint's, whose node of that name is another function)
        status, bp_id, version = await store.peek(self.run_id, RUN, list(DEFER_FIELDS))
        if status != RunStatus.RUNNING.value or bp_id != self.bp.id or version != self.bp.version:
            return None
        raw = (await store.peek(self.run_id, NODES, [self.node.id]))[0]
        if raw is MISSING or not isinstance(raw, dict):
            return None
        rec = NodeRecord.from_json(raw)
        if rec.status != NodeStatus.QUEUED or not self._for_this_job(rec):
            return None
        values = await store.peek(self.run_id, STATE, fields)
        self.node_input = node_input_from(self.node, {f: v for f, v in zip(fields, values, strict=True)
                                                      if v is not MISSING})
        self.deferred = rec
        self.claimed = True
        if self.engine.on_claim is not None:
            self.engine.on_claim(self.bp.id, job)
        return self._as_claimed(rec)

    def _for_this_job(self, rec: NodeRecord) -> bool:
        """Is ``rec`` at this step's job: its firing, phase, attempt and recovery?"""
        job = self.job
        return rec.seq == job.seq and rec.current_phase == job.kind and rec.attempt == job.attempt \
            and (rec.recovery or 0) == job.recovery

    def _as_claimed(self, rec: NodeRecord) -> NodeRecord:
        """``rec`` as this step's claim writes it (at ``claimed_at``)."""
        new = evolve(rec, status=NodeStatus.RUNNING, token=self.token, worker=self.engine.worker_id,
                     job=self.job.job_id, attempt_started_at=self.claimed_at)
        if self.job.attempt == 1 and self.job.kind == JobKind.EXEC:
            new.started_at = self.claimed_at
        return new

    def list_step(self, run: RunTxn) -> None:
        """List this step under its worker, in the claim's own transaction: from then on it is held while the
        worker lives, and recovered from the list when it dies (CONTRACT §6.1)."""
        run.t.listing.append((self.engine.worker_id, self.list_as, self.job.to_dict()))
        self.listed = True

    def unlist_step(self, run: RunTxn) -> None:
        if self.listed and not run.inline:  # a successor claimed inline took the entry over
            run.t.listing.append((self.engine.worker_id, self.list_as, None))

    async def commit(self, fn: Callable[[RunTxn, NodeRecord], Awaitable[None]], *, token: str | None = None,
                     status: NodeStatus = NodeStatus.RUNNING, unlist: bool = True,
                     lead: bool = False) -> list[tuple[str, Job]]:
        """Run ``fn`` if the node is still in the state this step left it in (same token). ``unlist=False``:
        the step goes on after this commit (a subflow starts its child run), so it stays listed. ``lead``: it
        commits nodes run ahead (engine.ahead), which it claims for this worker even once it stops claiming
        successors (a stopping worker: what ran is committed, what follows is queued)."""
        expect = token or self.token

        async def wrapped(run: RunTxn) -> bool:
            rec = await read_node(run.t, self.node.id)
            if self.deferred is not None and rec is not None and rec.token == self.token:
                # a late claim applied although its reply was lost: claimed (and listed) as any claim
                self.deferred = None
                self.listed = True
            if self.deferred is not None:  # claimed with this commit: the record must still be the queued one
                if rec is None or not await self._still_deferred(run, rec):
                    return False
                rec = self._as_claimed(rec)
            elif rec is None or rec.seq != self.job.seq or rec.status != status or rec.token != expect:
                return False
            await prefetch_commit(run.t, self.bp, self.node.id)
            await fn(run, rec)
            await run.settle()
            if run.inline_as is not None and not run.inline and not self.more and self.engine.inline_steps:
                # it made nothing ready for this worker: a queued sibling, if any
                await run.steal_queued(1 if self.waited else self.engine.sibling_claims)
            if self.deferred is not None and run.inline:
                self.list_step(run)  # the successor claimed for this worker is listed under this step's job
            if unlist:
                self.unlist_step(run)  # (unless a step it claimed takes its entry over)
            return True

        got = await self.txn(wrapped, inline=unlist and (self.engine.inline_steps or lead) and self.claimed)
        if got is not None and got[0] and unlist:
            self.listed = False
        for successor in self.inline:
            self.engine.active_tokens.add(successor.token)  # held from its claim on, not from when it starts
        if got is not None and got[0] and self._last_txn is not None:
            self.picked = self._last_txn.picked
            done = self._last_txn.finish_job
            if done is not None:
                self.engine.taken_jobs.discard(done)  # finished: later steps on its slot leave it alone
            self.left_queue = done == self.job.job_id or self.job.job_id in self._last_txn.unqueue
            self.unqueued = self._last_txn.unqueue
        if got is None or not got[0]:
            if self.redo:
                log.info("job %s: node %r ran on an input its run no longer holds for it; run again",
                         self.job.job_id, self.node.id)
            elif self.claimed:
                log.warning("job %s: fenced off: node %r of run %s is no longer claimed by this worker (the run "
                            "finished, or this worker missed its heartbeats and the step was recovered "
                            "elsewhere); result dropped", self.job.job_id, self.node.id, self.run_id)
            else:
                log.info("job %s: result discarded (the node moved on: duplicate delivery or run finished)",
                         self.job.job_id)
            self.stale = True
            return []
        return got[1]

    # ---- exec / fallback

    async def _run_exec(self) -> list[tuple[str, Job]]:
        rec = await self.claim()
        if rec is None:
            return []
        node = self.node
        runner = node if self.job.kind == JobKind.EXEC else self.bp.node_map[node.config.fallback or ""]
        node_input = self.node_input if self.claimed else \
            await read_node_input(self.engine.store, self.bp, node, self.run_id)
        uses = runner.uses
        if uses == "loop-controller":
            return await loop.run_loop(self, rec, node_input)
        if uses == "wait":
            return await wait.run_wait(self)
        if uses == "sleep":
            return await sleep.run_sleep(self, rec, node_input)
        if uses == "batch":
            return await batch.run_batch(self, rec, node_input)
        if uses == "subflow":
            return await subflow.run_subflow(self, rec, runner, node_input)
        writes: dict[str, Any] = {}
        late = asyncio.get_running_loop().call_later(LATE_CLAIM_S, self._claim_late) if self.deferred else None
        failure: NodeFailure | None = None
        running = self.preclaimed.running if self.preclaimed is not None else None
        try:
            if running is not None:  # its node was run ahead of its predecessor's commit, and still runs (ahead)
                self.waited = not running.done()
                output, action, writes = await running
            else:
                output, action, writes = await function.call_node(self, runner, node_input, self.job.attempt)
        except NodeFailure as e:
            failure = e
        finally:
            if late is not None:
                late.cancel()
        await self._late_claimed()  # (the node is done: a late claim under way ends, or is not started at all)
        if failure is not None:
            error, fatal, tb = str(failure), failure.fatal, failure.traceback
            self.log_failure(error, tb)
            return await self.commit(lambda run, r: run.fail_node(node, r, self.job, error, fatal, tb=tb))
        siblings = runner is node and self.more and self.claimed  # claimed with it: they may commit with it
        if runner is node and (siblings or ahead.may_lead(self)):
            route = await read_route(self.engine.store, self.bp, node, self.run_id, output, action, writes,
                                     node_input)
            if ahead.may_lead(self) and ahead.next_in_chain(self.bp, node, route) is not None:
                return await ahead.succeed_ahead(self, output, action, writes, node_input, route)
            if siblings:
                return await ahead.succeed_siblings(self, output, action, writes, route)
            return await self.succeed(output, action, writes, node_input, route=route)
        return await self.succeed(output, action, writes, node_input, runner)

    # ---- a deferred claim taken while the node runs (Engine.defer_claims)

    def _claim_late(self) -> None:
        """The node of a deferred claim still runs after LATE_CLAIM_S: claim it now, as a queued step's claim
        would have, so that it shows as running and is held like any claimed step from then on."""
        self._late = asyncio.ensure_future(self._late_claim())

    async def _late_claim(self) -> None:
        base = self.deferred

        async def fn(run: RunTxn) -> bool:
            rec = await read_node(run.t, self.node.id)
            if rec is None or not await self._still_deferred(run, rec):
                return False
            write_node(run.t, self.node.id, self._as_claimed(rec))
            run.t.listing.append((self.engine.worker_id, self.list_as, self.job.to_dict()))
            return True

        pause = LATE_CLAIM_S * 5
        while not self._node_done:
            try:
                got = await self.txn(fn)
            except Exception as e:  # (Redis away) tried again while the node runs; else its commit claims it
                log.warning("job %s: could not claim its running node yet (%s: %s); trying again in %.1fs",
                            self.job.job_id, type(e).__name__, e, pause)
                self._late_pause = asyncio.get_running_loop().create_future()
                timer = asyncio.get_running_loop().call_later(pause, _settle, self._late_pause)
                await self._late_pause  # (cut short when the node ends)
                timer.cancel()
                pause = min(pause * 2, 5.0)
                continue
            if got is not None and got[0] and self.deferred is base:
                self.deferred = None  # claimed: its commit finds it running with this step's token
                self.listed = True
            return

    async def _late_claimed(self) -> None:
        """The node is done: wait for a late claim under way (one waiting to try again stops), so the commit
        knows which record to expect."""
        self._node_done = True
        if self._late_pause is not None:
            _settle(self._late_pause)
        if self._late is not None:
            await asyncio.shield(self._late)

    async def _still_deferred(self, run: RunTxn, rec: NodeRecord) -> bool:
        """Is ``rec`` (read in a transaction) still the queued record this step's node runs for, with the input
        it runs on? Sets ``redo`` when only the input changed (a stale cache gave it another firing's)."""
        self.redo = False  # (decided again on fresh values, a transaction starts over)
        if rec.status != NodeStatus.QUEUED or not self._for_this_job(rec):
            return False
        if node_input_from(self.node, await run.t.get_many(STATE, input_fields(self.node))) != self.node_input:
            self.redo = True
            return False
        return True

    def log_failure(self, error: str, tb: str | None) -> None:
        """The attempt failed: note it as this step's outcome and, on workers, log it once (CONTRACT §10;
        called before the commit, so a commit decided again after a conflict does not log it again).
        In-process runs show it in the result."""
        self.failure = error
        if self.engine.log_failures:
            item = f" item {self.job.item}" if self.job.item >= 0 else ""
            log.warning("run %s node %s%s attempt %d failed: %s%s", self.run_id, self.node.id, item, self.job.attempt,
                        error, f"\n{tb.rstrip()}" if tb else "",
                        extra={"run_id": self.run_id, "node_id": self.node.id, "attempt": self.job.attempt,
                               "error": error, "traceback": tb})

    async def succeed(self, output: Any, action: str | None, writes: Mapping[str, Any], node_input: Any,
                      runner: NodeDef | None = None, token: str | None = None,
                      status: NodeStatus = NodeStatus.RUNNING, route: Route | None = None) -> list[tuple[str, Job]]:
        """Route the result (reads outside the transaction, unless ``route`` is given), then commit it if the
        node is still ``status`` with this step's token."""
        if route is None:
            route = await read_route(self.engine.store, self.bp, self.node, self.run_id, output, action, writes,
                                     node_input)
        fallback_of = self.node.id if runner is not None and runner.id != self.node.id else None

        async def fn(run: RunTxn, rec: NodeRecord) -> None:
            await run.complete(runner or self.node, rec, output, action, route, writes, fallback_of=fallback_of)

        return await self.commit(fn, token=token, status=status)
