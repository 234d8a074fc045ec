"""The engine's facade (CONTRACT §5): start, resume, cancel and retry runs, handle one job, and find or
recover the steps a run waits for. Both runtimes drive it:

* ``runtime.FlowRuntime`` runs jobs as asyncio tasks over a ``MemoryStore``;
* the arq workers run each job as one arq job over a ``RedisStore``.

A job is one step of one node (see ``jobs.Job``). Handling a job is: *claim* it (a transaction that
checks the node still expects exactly this step, so duplicates and stale deliveries are no-ops), do the
work outside any transaction (the user's function, a batch expansion, a child run), then *commit* the
outcome in one transaction: the output, the node's context writes, its status and timing, the join
bookkeeping of its successors, dead-path skips, the jobs that follow (written to the run's outbox) and
the run's status. Nothing is half-done after a crash (``step.Step``, ``lifecycle.RunTxn``).

Joins count arrivals per (target, generation, source): a duplicate delivery cannot count twice, and a
loop ``continue`` starts a new generation of the loop body. A node with one predecessor outside every loop
records none: its one arrival decides it at once, and its record then says so (``joins.decided_in``), so a
repeat of that arrival changes nothing (``reads.tracks_arrivals``).
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from ..blueprint import Blueprint
from ..errors import BlueprintUnavailable, InvalidInput, RunNotFound, StateConflict
from ..ids import check_run_id
from ..jobs import Job, Picked
from ..registry import NodeRegistry
from ..store import BATCH, JOINS, MISSING, NODES, OUTBOX, RUN, STATE, Store, Txn, check_json
from . import ahead
from .lifecycle import RunTxn
from .reads import first_reads, read_node_input, read_route, run_fields
from .routing import check_resume_action
from .state import (
    ACTIVE_NODE,
    DEFER_FIELDS,
    FINAL_STATUSES,
    GATE_FIELDS,
    META_FIELDS,
    BatchItem,
    InlineStep,
    ItemStatus,
    JobKind,
    NodeRecord,
    NodeStatus,
    ParentRef,
    Recovery,
    RunMeta,
    RunStatus,
    StepOutcome,
    batch_done_field,
    batch_size_field,
    batch_state_field,
    evolve,
    fetch_all_nodes,
    fetch_meta,
    fetch_node,
    now_ms,
    read_item,
    read_node,
    read_nodes,
    write_item,
    write_node,
)
from .step import Step

log = logging.getLogger("flowcraft.engine")
SEED_RUN_FIELDS = 64  # a blueprint with at most this many node records and join fields sends them with its start


@dataclass(slots=True)
class EngineSettings:
    ttl_s: int = 86400  # how long a finished run's keys stay; 0 = forever
    running_ttl_s: int = 7 * 86400  # how long an unfinished run's keys live after its last step
    version_grace_s: float = 300.0
    # an attempt's limit when its node sets no ``timeout`` (workers: ``job_timeout_seconds``); None = none
    attempt_timeout_s: float | None = None


@dataclass(slots=True)
class Handled:
    """What handling a job produced: jobs to queue (each with the run whose outbox holds it), or a
    request to try the same job again later (version gate)."""

    scheduled: list[tuple[str, Job]] = field(default_factory=list)
    retry_after_s: float | None = None
    outcome: StepOutcome = StepOutcome.OK
    failed: str | None = None  # the error of the node attempt this job ran, when it failed
    listed: bool = False  # the step is still listed under this worker (its claim's commit did not unlist it)
    run_status: RunStatus | None = None  # the run's status, when the outcome is RUN_FINISHED
    inline: InlineStep | None = None  # the successor claimed for this worker: handle it next (handle(job, inline))
    picked: Picked | None = None  # a queue job the commit took for this worker, to run next
    left_queue: bool = False  # a commit of the job's own step took the job out of the queue (Step.left_queue)
    unqueued: list[str] = field(default_factory=list)  # queued jobs its commit claimed (Txn.unqueue): not to run
    # more steps claimed for this worker to run after ``inline`` (``Engine.sibling_claims``): pass them with it
    more: list[InlineStep] = field(default_factory=list)

    def describe(self) -> str:
        """The outcome as a worker's log line says it (``ok``, ``stale``, ``run is completed`` ...)."""
        if self.outcome == StepOutcome.RUN_FINISHED:
            return f"run is {self.run_status}"
        return self.outcome.value


class Engine:
    def __init__(
        self,
        store: Store,
        blueprints: Mapping[str, Blueprint],
        registry: NodeRegistry,
        *,
        worker_id: str = "local",
        settings: EngineSettings | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.blueprints = blueprints
        self.registry = registry
        self.worker_id = worker_id
        self.settings = settings or EngineSettings()
        self.clock = clock
        self.active_tokens: set[str] = set()  # claims held by steps running in this process right now
        # may a step's commit claim a successor it fires for this worker to run next (Handled.inline)? Only a
        # driver that then runs it (the arq worker, FlowRuntime) turns this on
        self.inline_steps = False
        # may a commit with nothing to run next claim a step of its run this process queued, for its worker
        # (RunTxn.steal_queued)? For a worker, whose jobs wait in a shared queue; not in-process, where each
        # queued step has its own task already
        self.take_queued = False
        # and may such a commit that claims no successor take its queue's next ready job for this worker, locked
        # for this many ms (0: no)? Only a driver that runs it and renews its lock (the arq worker) sets it
        self.pick_ms = 0
        # may a step of a queue job delivered for the first time run its node before it claims it, and claim it
        # in the commit that records its outcome (one transaction, not two)? A redelivered job (its worker may
        # have died running it) claims first, so that a node that kills its worker has its lost attempts counted
        self.defer_claims = False
        # may a step run the chain after it ahead of its commit, and commit them together (engine.ahead)? Only
        # where an uncommitted step is recovered, so on workers (set with inline_steps)
        self.fuse_steps = False
        self.group_max = ahead.GROUP_MAX  # nodes a group commit holds at most
        # how many queued siblings a commit with nothing else to run next may claim for this worker at once (1: one,
        # run as an inline step). With more, the step given them runs their nodes after its own and commits them
        # all together (engine.ahead.succeed_siblings): a fan-out costs a transaction per group of branches. Only
        # in-process (FlowRuntime): on workers one entry in a worker's list of steps holds one claimed step
        self.sibling_claims = 1
        # has this worker held its lease without a break since a (monotonic) time? A step of a worker that was
        # paused or cut off past its lease may be recovered elsewhere: it runs nothing ahead (engine.ahead)
        self.lease_held: Callable[[float], bool] | None = None
        self.taken_jobs: set[str] = set()  # queue jobs this worker took that way and runs now (finished by commits)
        self._queued: OrderedDict[str, deque[str]] = OrderedDict()  # run id -> nodes this process queued (hints)
        # Is a step claimed by another worker still held (worker alive and still running it)? The driver
        # knows (workers: the heartbeat registry); with none, only this process's own steps are held.
        self.is_held_remote: Callable[[str, str], Awaitable[bool]] | None = None
        self.log_failures = False  # workers log every failed attempt (with its traceback) at WARNING
        # told (blueprint id, job) when a step claims a node attempt: where an attempt starts (worker metrics)
        self.on_claim: Callable[[str, Job], None] | None = None
        # Where a client finds the blueprint of a run this process did not load (or loaded at another
        # version): the driver knows (workers: the definitions recorded in Redis at each run's start).
        self.load_definition: Callable[[str, str], Awaitable[Blueprint | None]] | None = None

    # ------------------------------------------------------------------ starting, resuming, cancelling

    async def start_run(
        self,
        blueprint_id: str,
        run_input: Any = None,
        *,
        run_id: str | None = None,
        parent: ParentRef | None = None,
        seed: Mapping[str, Any] | None = None,
    ) -> tuple[str, list[tuple[str, Job]]]:
        """Create a run and schedule its start nodes. ``run_input`` (a JSON object for top-level runs)
        seeds the context and is the input of every start node; ``seed`` overrides the seeded keys."""
        bp = self.blueprints.get(blueprint_id)
        if bp is None:
            known = ", ".join(sorted(self.blueprints)) or "none loaded"
            raise InvalidInput(f"unknown blueprint id {blueprint_id!r} (known: {known})")
        if parent is None and run_id is not None:
            check_run_id(run_id)  # a child's id is derived (ids.child_run_id), never given by a user
        run_id = run_id or secrets.token_hex(8)
        context_seed = dict(run_input) if isinstance(run_input, Mapping) else {}
        if seed is not None:
            context_seed = dict(seed)
        for key, value in context_seed.items():
            _check_json(value, f"run input key {key!r}")
        _check_json(run_input, "run input")
        ancestors: list[str] = []  # outermost first, the parent last
        if parent is not None:
            above = (await self.store.read(parent.run_id, RUN, ["ancestors"]))[0]
            ancestors = [*(above if isinstance(above, list) else []), parent.run_id]

        async def txn_fn(t: Txn) -> list[tuple[str, Job]]:
            # a new run: nothing of it exists yet (checked by the commit, not read first)
            t.assume_absent({RUN: list(META_FIELDS), **run_fields(bp)})
            if await t.get(RUN, "status") is not None:
                if parent is not None:
                    return []  # a redelivered subflow step: the child already exists
                raise InvalidInput(f"run id {run_id!r} already exists")
            ts = self.clock()
            meta = RunMeta(status=RunStatus.RUNNING, blueprint_id=bp.id, blueprint_version=bp.version, pending=0,
                           awaiting_nodes=[], created_at=ts, parent=parent, ancestors=ancestors)
            for name in ("status", "blueprint_id", "blueprint_version", "pending", "awaiting_nodes", "created_at",
                         "parent", "ancestors"):
                t.put(RUN, name, meta.field_json(name))
            for key, value in context_seed.items():
                t.put(STATE, str(key), value)
            t.put(STATE, "blueprintId", bp.id)
            t.put(STATE, "blueprintVersion", bp.version)
            t.event({"type": "run_started", "ts": ts, "blueprint_id": bp.id, "version": bp.version})
            t.started = bp
            run = RunTxn(self, t, bp)
            for node_id in bp.start_nodes:
                await run.fire(node_id, run_input)
            await run.settle()
            # what each start job's claim reads, sent with it where a store can; and, for a small blueprint, what
            # the run's next steps read (every node record and join field, all absent): the worker then
            # reads nothing before the run's first commit
            known = run_fields(bp)
            small = sum(map(len, known.values())) <= SEED_RUN_FIELDS
            for _, job in run.scheduled:
                wanted = first_reads(bp.node_map[job.node_id])
                if small:
                    wanted = {**wanted, NODES: list(dict.fromkeys([*wanted[NODES], *known[NODES]])),
                              JOINS: list(known[JOINS])}
                t.seeds[job.job_id] = wanted
            return run.scheduled

        return run_id, await self.store.transact(run_id, txn_fn)

    async def resume(
        self, run_id: str, node_id: str | None = None, *, output: Any = None, action: str | None = None
    ) -> list[tuple[str, Job]]:
        """Give an awaiting ``wait`` node its output and action; routing follows the action."""
        _check_json(output, "resume output")
        meta = await self.read_meta(run_id)
        bp = await self._blueprint_for(meta, run_id)
        waiting = list(meta.awaiting_nodes)
        if meta.status not in (RunStatus.AWAITING, RunStatus.RUNNING) or not waiting:
            raise StateConflict(f"run {run_id!r} is {meta.status}, not awaiting a resume")
        if node_id is None:
            if len(waiting) > 1:
                raise InvalidInput(f"run {run_id!r} awaits several nodes ({', '.join(waiting)}): pass --node")
            node_id = waiting[0]
        if node_id not in bp.node_map:
            raise InvalidInput(f"run {run_id!r}: blueprint {bp.id!r} has no node {node_id!r}")
        if node_id not in waiting:
            raise StateConflict(f"node {node_id!r} of run {run_id!r} is not awaiting (awaiting: {', '.join(waiting)})")
        node = bp.node_map[node_id]
        check_resume_action(bp, node_id, action)
        stored = await fetch_node(self.store, run_id, node_id)
        if stored is not None and stored.child:
            return await self._resume_child(run_id, bp, node_id, stored.child, output, action)
        route = await read_route(self.store, bp, node, run_id, output, action, {},
                                 await read_node_input(self.store, bp, node, run_id))

        async def txn_fn(t: Txn) -> list[tuple[str, Job]]:
            run = RunTxn(self, t, bp)
            m = await run.meta()
            rec = await read_node(t, node_id)
            if m.status not in (RunStatus.AWAITING, RunStatus.RUNNING) or rec is None \
                    or rec.status != NodeStatus.AWAITING:
                raise StateConflict(f"node {node_id!r} of run {run_id!r} is no longer awaiting")
            run.set_meta(awaiting_nodes=[n for n in m.awaiting_nodes if n != node_id])
            run.set_meta(status=RunStatus.RUNNING)
            run.add_pending(1)
            t.event({"type": "resumed", "ts": self.clock(), "node": node_id, "action": action})
            await run.complete(node, rec, output, action, route, {})
            await run.settle()
            return run.scheduled

        return await self.store.transact(run_id, txn_fn)

    async def _resume_child(self, run_id: str, bp: Blueprint, node_id: str, child_id: str, output: Any,
                            action: str | None) -> list[tuple[str, Job]]:
        """Resume a subflow node: the waiting happens in its child run, so the resume goes there; the node
        runs again until the child ends (and a ``child`` job completes it)."""
        child_meta = await self.read_meta(child_id)
        waiting = list(child_meta.awaiting_nodes)
        if child_meta.status != RunStatus.AWAITING:
            raise StateConflict(f"subflow node {node_id!r}: its child run {child_id!r} is {child_meta.status}, "
                                "not awaiting")
        if len(waiting) != 1:
            raise InvalidInput(f"subflow node {node_id!r} waits in child run {child_id!r} on "
                               f"{', '.join(waiting) or 'nothing'}: resume the child run itself")
        # refuse a bad action before the parent changes: a refused resume must leave the parent awaiting
        check_resume_action(await self._blueprint_for(child_meta, child_id), waiting[0], action)
        woken: list[NodeRecord] = []  # the record as this resume woke it (the last try of the transaction)

        async def txn_fn(t: Txn) -> None:
            run = RunTxn(self, t, bp)
            m = await run.meta()
            rec = await read_node(t, node_id)
            if rec is None or rec.status != NodeStatus.AWAITING:
                raise StateConflict(f"node {node_id!r} of run {run_id!r} is no longer awaiting")
            woken[:] = [evolve(rec, status=NodeStatus.RUNNING)]
            write_node(t, node_id, woken[0])
            run.set_meta(awaiting_nodes=[n for n in m.awaiting_nodes if n != node_id])
            run.set_meta(status=RunStatus.RUNNING)
            run.add_pending(1)

        async def undo(t: Txn) -> None:
            run = RunTxn(self, t, bp)
            m = await run.meta()
            if await read_node(t, node_id) != woken[0] or m.status != RunStatus.RUNNING:
                return  # the node moved on meanwhile (the child ended and told it): nothing to put back
            write_node(t, node_id, evolve(woken[0], status=NodeStatus.AWAITING))
            run.set_meta(awaiting_nodes=[*m.awaiting_nodes, node_id])
            run.add_pending(-1)
            if m.pending == 0:
                run.set_meta(status=RunStatus.AWAITING)

        await self.store.transact(run_id, txn_fn)
        try:
            return await self.resume(child_id, waiting[0], output=output, action=action)
        except (InvalidInput, StateConflict):
            # the child refused after all (resumed by someone else meanwhile): the parent awaits as before
            await self.store.transact(run_id, undo)
            raise

    async def cancel(self, run_id: str, reason: str = "cancelled by user") -> tuple[bool, list[tuple[str, Job]]]:
        """Cancel a run that has not finished; no further node of it starts. Children are cancelled too.
        Returns whether anything changed, and the jobs to queue (a cancelled child tells its parent)."""
        meta = await self.read_meta(run_id)
        bp = await self._blueprint_for(meta, run_id)

        async def txn_fn(t: Txn) -> tuple[bool, list[tuple[str, str, ParentRef]], list[tuple[str, Job]]]:
            run = RunTxn(self, t, bp)
            m = await run.meta()
            if m.status in FINAL_STATUSES:
                return False, [], []
            nodes = await read_nodes(t, bp.node_map)
            # each child with the parent reference its start writes (as builtins.subflow builds it)
            children = [(r.child, str(bp.node_map[n].params.get("blueprintId")),
                         ParentRef(run_id, n, r.seq, r.attempt or 0))
                        for n, r in nodes.items()
                        if r.child and r.status in (NodeStatus.RUNNING, NodeStatus.AWAITING)]
            await run.finalize(RunStatus.CANCELLED, reason)
            return True, children, run.scheduled

        changed, children, scheduled = await self.store.transact(run_id, txn_fn)
        for child, child_bp, parent in children:
            # the child may be created at this very moment: either the tombstone or the child's start wins,
            # and when the start won, the child now exists and is cancelled like any other
            while True:
                try:
                    scheduled += (await self.cancel(child, f"parent run {run_id} cancelled"))[1]
                    break
                except RunNotFound:
                    if await self._tombstone(child, child_bp, f"parent run {run_id} cancelled", parent):
                        break
        return changed, scheduled

    async def retry(self, run_id: str) -> list[tuple[str, Job]]:
        """A failed run goes on from where it failed (CONTRACT §10): the node that failed it, and every node
        its failure stopped, run again under the same run id with fresh attempts; completed nodes keep their
        outputs, and join arrivals already made still count. What the failure kept from running (its
        successors) runs when routing reaches it, as in any run."""
        meta = await self.read_meta(run_id)
        bp = await self._blueprint_for(meta, run_id)
        if meta.status != RunStatus.FAILED:
            raise StateConflict(f"run {run_id!r} is {meta.status}; only a failed run can be retried")
        if meta.parent is not None:
            raise StateConflict(f"run {run_id!r} is a subflow of run {meta.parent.run_id!r}: retry that run")
        if bp.version != meta.blueprint_version:
            raise StateConflict(f"run {run_id!r} ran blueprint {bp.id!r} version {meta.blueprint_version!r}; "
                                f"this one has version {bp.version!r}")

        async def txn_fn(t: Txn) -> list[tuple[str, Job]]:
            run = RunTxn(self, t, bp)
            m = await run.meta()
            if m.status != RunStatus.FAILED:
                raise StateConflict(f"run {run_id!r} is {m.status}; only a failed run can be retried")
            records = await read_nodes(t, bp.node_map)
            again = [n.id for n in bp.nodes if (rec := records.get(n.id)) and rec.status == NodeStatus.FAILED
                     and (n.id == m.failed_node or (rec.error or "").startswith("stopped: "))]
            if not again:
                raise StateConflict(f"run {run_id!r} has no failed node to run again")
            ts = self.clock()
            run.set_meta(status=RunStatus.RUNNING, reason=None, finished_at=None, failed_node=None, awaiting_nodes=[],
                         pending=0)
            t.unfinal = True
            t.event({"type": "run_retried", "ts": ts, "nodes": again})
            for node_id in again:
                rec = records[node_id]
                # the node's record starts over as never fired in this generation, its busy count undone
                write_node(t, node_id, evolve(rec, status=NodeStatus.PENDING, error=None, fired_gen=rec.gen - 1,
                                               token=None, job=None, child=None, items=None, phase=JobKind.EXEC,
                                               lost_in_row=0, recovery=0))
                await run.count_busy(node_id, -1)
                node_input: Any = await t.get(STATE, f"_inputs.{node_id}")
                await run.fire(node_id, node_input)
            # nodes still counted busy or pending from before the failure are the ones just fired
            pending = sum(1 for r in (await read_nodes(t, bp.node_map)).values()
                          if r.status in (NodeStatus.QUEUED, NodeStatus.RUNNING, NodeStatus.SLEEPING))
            run.set_meta(pending=pending)
            await run.settle()
            return run.scheduled

        return await self.store.transact(run_id, txn_fn)

    async def _tombstone(self, run_id: str, blueprint_id: str, reason: str, parent: ParentRef) -> bool:
        """A child the parent recorded but had not created yet: create it as cancelled (with the parent its
        start would write), so the step that was about to start it finds it exists and starts nothing.
        Returns False when the run exists already (its start won the race)."""
        async def fn(t: Txn) -> bool:
            if await t.get(RUN, "status") is not None:
                return False
            meta = RunMeta(status=RunStatus.CANCELLED, reason=reason, blueprint_id=blueprint_id, blueprint_version="",
                           pending=0, awaiting_nodes=[], finished_at=self.clock(), parent=parent)
            for name in ("status", "reason", "blueprint_id", "blueprint_version", "pending", "awaiting_nodes",
                         "finished_at", "parent"):
                t.put(RUN, name, meta.field_json(name))
            t.final = ({"status": RunStatus.CANCELLED.value, "reason": reason, "payload": None},
                       self.settings.ttl_s)
            return True
        return await self.store.transact(run_id, fn)

    async def expected_jobs(self, run_id: str) -> tuple[list[Job], list[str], list[tuple[Job, str, str]]]:
        """Every step a running run is waiting for, as the jobs that would carry them: its outbox, and each
        queued, sleeping or batch step. The reconciler queues those whose job is gone; queueing one that
        still exists is a no-op (same job id), and a stale one is dropped at its claim. Also returns the
        outbox entries read, which the caller may clear once it has queued what they stand for, and the
        claimed steps no live worker holds any more, as (claim job, worker, the entry it is listed under in
        that worker's list: its own job's id, or for a step claimed inline its chain's): ``recover`` those."""
        meta = await self.find_meta(run_id)
        if meta is None:
            return [], [], []
        running = meta.status == RunStatus.RUNNING
        if running:
            await self._blueprint_for(meta, run_id)  # a run no loaded blueprint describes cannot be resumed from here
        jobs: dict[str, Job] = {}
        lost: list[tuple[Job, str, str]] = []
        live = running or meta.status == RunStatus.AWAITING
        records = await fetch_all_nodes(self.store, run_id) if live else {}
        outbox = await self.store.read_all(run_id, OUTBOX)
        for data in outbox.values():
            job = Job.from_dict(data)
            rec = records.get(job.node_id) if job.run_id == run_id else None
            # a finished child's note to its parent always counts; a step of this run only while expected (an
            # awaiting node expects no job of its own: its resume or its child's note moves it)
            if job.run_id != run_id or (rec and rec.seq == job.seq and rec.status in ACTIVE_NODE
                                        and rec.status != NodeStatus.AWAITING):
                jobs[job.job_id] = job  # else: the step already happened; a leftover entry, not a lost job
        if meta.status == RunStatus.AWAITING and (parent := meta.parent) is not None:
            # a waiting child tells its parent (idempotent), in case that note was lost: the parent's node
            # still runs this child (once told, it awaits too)
            prec = await fetch_node(self.store, parent.run_id, parent.node_id)
            if prec is not None and prec.seq == parent.seq and prec.status == NodeStatus.RUNNING:
                wait = Job(parent.run_id, parent.node_id, parent.seq, "child_wait", parent.attempt)
                jobs[wait.job_id] = wait
        for node_id, rec in records.items():
            status, seq, phase = rec.status, rec.seq, rec.current_phase.value
            found: list[Job] = []
            if status == NodeStatus.QUEUED:
                found.append(Job(run_id, node_id, seq, phase, _attempt(rec), not_before_ms=rec.retry_at or 0,
                                 recovery=rec.recovery or 0))
            elif status == NodeStatus.SLEEPING:
                found.append(Job(run_id, node_id, seq, "wake", 1, not_before_ms=rec.wake_at or 0))
            elif status in (NodeStatus.RUNNING, NodeStatus.AWAITING) and rec.child:
                if (st := await self.store.read_status(rec.child)) and st["status"] in FINAL_STATUSES:
                    found.append(Job(run_id, node_id, seq, "child", _attempt(rec)))
                elif status == NodeStatus.RUNNING and (
                        (cm := await self.find_meta(rec.child)) and cm.status == RunStatus.AWAITING):
                    found.append(Job(run_id, node_id, seq, "child_wait", _attempt(rec)))
            elif status == NodeStatus.RUNNING and rec.items is not None:
                n, done = await self.store.read(run_id, BATCH, [batch_size_field(node_id, seq),
                                                                batch_done_field(node_id, seq)])
                if done is not MISSING and n is not MISSING and done >= n:
                    found.append(Job(run_id, node_id, seq, "gather", 1))
                else:
                    states = await self.store.read(run_id, BATCH, [batch_state_field(node_id, seq, i)
                                                                for i in range(int(n or 0))])
                    for i, data in enumerate(states):
                        if data is MISSING:
                            continue
                        item = BatchItem.from_json(data)
                        item_job = Job(run_id, node_id, seq, "item", item.attempt, item=i,
                                       recovery=item.recovery or 0)
                        if item.status == ItemStatus.QUEUED:
                            found.append(item_job)
                        elif item.status == ItemStatus.RUNNING and not await self.claim_is_held(item):
                            lost.append((item_job, item.worker or "", item.job or item_job.job_id))
            elif status == NodeStatus.RUNNING and rec.token and not await self.claim_is_held(rec):
                claim = _job_of(run_id, node_id, rec)
                lost.append((claim, rec.worker or "", rec.job or claim.job_id))
            for job in found:
                jobs.setdefault(job.job_id, job)
        return list(jobs.values()), list(outbox), lost

    # ------------------------------------------------------------------ handling one job

    async def handle(self, job: Job, inline: InlineStep | None = None, *, first: bool = False,
                     reread: frozenset[tuple[str, str]] = frozenset(),
                     more: list[InlineStep] | None = None) -> Handled:
        """Handle one job: a queued one, or (``inline``) a successor the previous step's commit claimed for
        this worker (``Handled.inline``), which is still listed under this worker if it does not run.
        ``first``: its first delivery (``defer_claims``); ``reread``: the (kind, field) pairs the store holds
        as they were when the job was taken, read then (``Step._defer_claim`` need not read them again).
        ``more``: the steps claimed with it for this worker (``Handled.more``): its step may run some of them
        with it; what it leaves comes back in ``Handled.inline`` and ``Handled.more``, to be handled next."""
        left = list(more or ())  # (the step takes out those it ran)
        try:
            handled = await self._handle(job, inline, first=first, reread=reread, more=left)
        finally:
            if inline is not None:  # held from its claim until its step ends here (or never starts)
                self.active_tokens.discard(inline.token)
                if inline.running is not None:  # its node, run ahead: ended, or cancelled if its step did not run
                    inline.running.cancel()
                    await ahead.drop(inline.running)
        if inline is not None and handled.outcome not in (StepOutcome.OK, StepOutcome.STALE):
            handled.listed = True  # never ran: the driver unlists it
        if left:  # claimed and not run: after what this step's commit claimed
            after = [*([handled.inline] if handled.inline is not None else []), *handled.more, *left]
            handled.inline, handled.more = after[0], after[1:]
        return handled

    async def _handle(self, job: Job, inline: InlineStep | None, *, again: bool = False, first: bool = False,
                      reread: frozenset[tuple[str, str]] = frozenset(), more: list[InlineStep]) -> Handled:
        # the meta as this process last saw it, where it remembers: the step's claim checks it again in its
        # transaction; only a meta that would stop the step here is read afresh first. A run new to this
        # process is fetched with what its claim reads (for a node without `inputs`), in one go. A first delivery
        # reads the run's status and blueprint, the node's record and its input anew with it, unless the commit
        # that took its job did (``reread``): its step may run the node before claiming it (Step._defer_claim)
        anew: dict[str, list[str]] = {}
        if first and self.defer_claims and inline is None and not reread:
            anew = {RUN: list(DEFER_FIELDS), NODES: [job.node_id], STATE: [f"_inputs.{job.node_id}"]}
            reread = frozenset((kind, f) for kind, names in anew.items() for f in names)
        await self.store.preload(job.run_id, {RUN: list(META_FIELDS), NODES: [job.node_id],
                                              STATE: [f"_inputs.{job.node_id}"]}, anew=anew)
        meta = await self.find_meta(job.run_id, cached=True, fields=GATE_FIELDS)
        if meta is None or meta.status in FINAL_STATUSES or meta.version_wait_since is not None \
                or (bp := self.blueprints.get(meta.blueprint_id)) is None or bp.version != meta.blueprint_version:
            meta = await self.find_meta(job.run_id)
        if meta is None:
            log.warning("job %s: run %r does not exist (expired or never started); dropped", job.job_id, job.run_id)
            return Handled(outcome=StepOutcome.UNKNOWN_RUN)
        if meta.status in FINAL_STATUSES:
            return Handled(outcome=StepOutcome.RUN_FINISHED, run_status=meta.status)
        bp = self.blueprints.get(meta.blueprint_id)
        if bp is None or bp.version != meta.blueprint_version:
            return await self._version_gate(job, meta, bp)
        node = bp.node_map.get(job.node_id)
        if node is None:
            log.error("job %s: node %r is not in blueprint %r; dropped", job.job_id, job.node_id, bp.id)
            return Handled(outcome=StepOutcome.UNKNOWN_NODE)
        # (its transactions restart the version grace: Step.txn)
        step = Step(self, bp, node, job, inline, first=first, reread=reread, more=more)
        scheduled = await step.run()
        if step.redo and step.stale:  # its node ran on an input not its firing's (a stale memory): again, claimed
            return await self._handle(job, inline, again=again, more=more)
        if step.other_blueprint and inline is None and not again:
            # the blueprint was chosen on what this process remembered of the run, and the run in Redis is of
            # another (its id was used again after it expired): forget it, and handle the job on fresh values
            self.store.forget(job.run_id)
            return await self._handle(job, inline, again=True, more=more)
        if step.held_elsewhere:
            # a live worker runs this very step (a duplicate delivery): it commits, or, should it die, the
            # step is recovered from its worker's list; this copy has nothing to do
            return Handled(outcome=StepOutcome.HELD_ELSEWHERE)
        return Handled(scheduled=scheduled, outcome=StepOutcome.STALE if step.stale else StepOutcome.OK,
                       failed=step.failure, listed=step.listed, inline=step.inline[0] if step.inline else None,
                       picked=step.picked, left_queue=step.left_queue, unqueued=step.unqueued, more=step.inline[1:])

    def note_queued(self, run_id: str, node_id: str) -> None:
        """A commit here queued ``node_id``'s step: a later commit of the run here may run it instead."""
        hints = self._queued.get(run_id)
        if hints is None:
            hints = self._queued[run_id] = deque(maxlen=10_000)
            while len(self._queued) > 1_000:
                self._queued.popitem(last=False)
        hints.append(node_id)

    def queued_hints(self, run_id: str) -> deque[str]:
        return self._queued.get(run_id) or deque()

    def forget_queued(self, run_id: str) -> None:
        self._queued.pop(run_id, None)

    async def claim_is_held(self, holder: NodeRecord | BatchItem) -> bool:
        """Is a claim (a node record or a batch item) still held by a live step? This process's own claims
        are held while their step runs here (one that died with a Redis error and was handed back is not);
        another worker's while that worker is alive and still lists the step (CONTRACT §6.1)."""
        token, worker = holder.token, holder.worker
        if not token:
            return False
        if worker == self.worker_id:
            return token in self.active_tokens
        if self.is_held_remote is None or not worker or not holder.job:
            return False
        return await self.is_held_remote(worker, holder.job)

    async def recover(self, job: Job, worker: str, *, lost: bool = True,
                      held_as: str | None = None) -> tuple[Recovery, list[tuple[str, Job]]]:
        """Recover a step that ``worker`` was running and no longer holds (it died, was cut off past its
        lease, or dropped the step after a Redis error). A step still waiting for its claim is queued again as
        it is; a claimed one becomes a new job (recovery + 1, so a new id) and, when ``lost``, its attempt is
        recorded as lost. ``maxRetries`` lost attempts in a row fail the node: one that kills its worker every
        time must end. Serialized with every commit of the run, so a step that did commit meanwhile is
        left alone, and a worker that comes back later finds its claim gone (fenced off). ``held_as``: the
        id the step is listed under (its queue job's, or for a step claimed inline its chain's first job's)."""
        held_as = held_as or job.job_id
        meta = await self.find_meta(job.run_id)
        if meta is None or meta.status in FINAL_STATUSES:
            return Recovery.NOTHING, []
        bp = await self._find_blueprint(meta)
        if bp is None or bp.version != meta.blueprint_version:
            return Recovery.UNKNOWN, []  # a worker with this blueprint version recovers it

        async def decide(run: RunTxn, t: Txn, job: Job) -> Recovery:
            node = bp.node_map.get(job.node_id)
            if node is None:
                return Recovery.NOTHING
            if job.kind not in (JobKind.EXEC, JobKind.FALLBACK, JobKind.ITEM):
                return Recovery.REQUEUE  # gather, wake, child: claim nothing; they check their own state
            if (await run.meta()).status in FINAL_STATUSES:
                return Recovery.NOTHING
            rec = await read_node(t, node.id)
            if rec is None or rec.seq != job.seq:
                return Recovery.NOTHING
            if job.kind == JobKind.ITEM:
                if rec.status != NodeStatus.RUNNING or rec.current_phase != JobKind.EXEC or rec.items is None:
                    return Recovery.NOTHING  # the batch node moved on (finished, failed over to its fallback)
                st = await read_item(t, node.id, job.seq, job.item)
                if st is None or st.attempt != job.attempt or (st.recovery or 0) != job.recovery:
                    return Recovery.NOTHING
                if st.status == ItemStatus.QUEUED:
                    return Recovery.REQUEUE
                if st.status != ItemStatus.RUNNING or st.worker != worker or st.job != held_as:
                    return Recovery.NOTHING
                if await self.claim_is_held(st):
                    return Recovery.HELD
                failed = False
                if lost:
                    st, failed = await run.lose_item(node, rec, st, job, worker)
                if not failed:
                    write_item(t, node.id, job.seq, job.item, BatchItem(
                        ItemStatus.QUEUED, job.attempt, recovery=job.recovery + 1, lost_in_row=st.lost_in_row or 0))
                    run.schedule(Job(job.run_id, node.id, job.seq, "item", job.attempt, item=job.item,
                                     recovery=job.recovery + 1))
                await run.settle()
                return Recovery.RECOVERED
            if rec.current_phase != job.kind or rec.attempt != job.attempt or (rec.recovery or 0) != job.recovery:
                return Recovery.NOTHING
            if rec.status == NodeStatus.QUEUED:
                return Recovery.REQUEUE
            if rec.status != NodeStatus.RUNNING or rec.worker != worker or rec.job != held_as:
                return Recovery.NOTHING
            if await self.claim_is_held(rec):
                return Recovery.HELD
            redo = Job(job.run_id, node.id, job.seq, job.kind, job.attempt, recovery=job.recovery + 1)
            if rec.child or rec.items is not None:
                # the attempt's work lives on (a child run, batch items): drive it again, lose nothing
                write_node(t, node.id, evolve(rec, recovery=job.recovery + 1))
                run.schedule(redo)
                return Recovery.RECOVERED
            failed = False
            if lost:
                rec, failed = await run.lose_attempt(node, rec, job, worker)
            if not failed:
                write_node(t, node.id, evolve(rec, status=NodeStatus.QUEUED, token=None, job=None,
                                               recovery=job.recovery + 1))
                run.schedule(redo)
            await run.settle()
            return Recovery.RECOVERED

        async def fn(t: Txn) -> tuple[Recovery, list[tuple[str, Job]]]:
            run = RunTxn(self, t, bp)
            step = await _listed_step(self.store, t, job, worker, held_as)
            outcome = Recovery.UNKNOWN if step is None else await decide(run, t, step)
            return outcome, run.scheduled

        return await self.store.transact(job.run_id, fn)

    async def _version_gate(self, job: Job, meta: RunMeta, bp: Blueprint | None) -> Handled:
        """A worker without the run's blueprint version leaves the job to one that has it; after the grace
        period the run fails, naming both versions."""
        mine = "no such blueprint" if bp is None else f"version {bp.version!r}"
        theirs = f"blueprint {meta.blueprint_id!r} version {meta.blueprint_version!r}"
        since = meta.version_wait_since
        now = self.clock()
        if since is None:
            async def mark(t: Txn) -> None:
                if await t.get(RUN, "version_wait_since") is None:
                    t.put(RUN, "version_wait_since", now)
            await self.store.transact(job.run_id, mark)
            since = now
        if (now - since) / 1000 < self.settings.version_grace_s:
            log.warning("job %s needs %s; this worker has %s: leaving it for another worker",
                        job.job_id, theirs, mine)
            return Handled(retry_after_s=min(5.0, max(0.5, self.settings.version_grace_s / 10)),
                           outcome=StepOutcome.VERSION_MISMATCH)
        reason = (f"no worker with {theirs} took node {job.node_id!r} within "
                  f"{self.settings.version_grace_s:g}s (this worker has {mine})")
        fake_bp = bp or Blueprint(id=meta.blueprint_id, nodes=(), edges=())

        async def fail(t: Txn) -> None:
            run = RunTxn(self, t, fake_bp)
            if (await run.meta()).status not in FINAL_STATUSES:
                await run.finalize(RunStatus.FAILED, reason)
        await self.store.transact(job.run_id, fail)
        return Handled(outcome=StepOutcome.VERSION_GRACE_EXPIRED)

    # ------------------------------------------------------------------ helpers shared by steps

    async def find_meta(self, run_id: str, *, cached: bool = False,
                        fields: tuple[str, ...] = META_FIELDS) -> RunMeta | None:
        meta = await fetch_meta(self.store, run_id, cached=cached, fields=fields)
        return None if meta.status is None else meta

    async def read_meta(self, run_id: str) -> RunMeta:
        meta = await self.find_meta(run_id)
        if meta is None:
            raise RunNotFound(f"run {run_id!r} not found (it never existed or its keys expired)")
        return meta

    async def _blueprint_for(self, meta: RunMeta, run_id: str) -> Blueprint:
        bp = await self._find_blueprint(meta)
        if bp is None:
            where = "not loaded here, and its definition is not in the store" if self.load_definition else "not loaded"
            raise BlueprintUnavailable(f"run {run_id!r} uses blueprint {meta.blueprint_id!r}, which is {where}")
        return bp

    async def _find_blueprint(self, meta: RunMeta) -> Blueprint | None:
        """The blueprint a run was started with: the loaded one at the run's version, else the run's own
        definition (``load_definition``), else the loaded one at another version. Only for what a client
        does to a run (cancel, resume, reconcile, recover a lost step); a step runs on its worker's own
        blueprint, behind the version gate."""
        bp = self.blueprints.get(meta.blueprint_id)
        version = meta.blueprint_version
        if (bp is None or bp.version != version) and self.load_definition is not None and version:
            stored = await self.load_definition(meta.blueprint_id, version)
            if stored is not None:
                return stored
        return bp


async def _listed_step(store: Store, t: Txn, job: Job, worker: str, held_as: str) -> Job | None:
    """The step that holds the entry ``held_as`` in ``worker``'s list of steps, as its current job. The entry
    names the job it was made for, and is not rewritten when its step hands it on to a successor (or a queued
    sibling, or its own retry) that its commit claimed to run next: the step holding it is the one whose
    claim names it, running. A batch or subflow node whose items or child run are under way keeps naming the
    entry it was started under: a plain step holding the entry comes first, and only without one is the
    listed step itself driven on (``recover``). None: the step found moved on between the look and the
    transaction (a worker past its lease still working): what it claimed next was not seen, so it is looked
    at again later rather than taken for nothing left to recover."""
    if job.kind not in (JobKind.EXEC, JobKind.FALLBACK):
        return job

    def holds(rec: NodeRecord | None) -> TypeGuard[NodeRecord]:
        return rec is not None and rec.status == NodeStatus.RUNNING and rec.worker == worker \
            and rec.job == held_as and rec.attempt is not None and not rec.child and rec.items is None

    moved = False
    own = await read_node(t, job.node_id)
    if holds(own):
        return _job_of(job.run_id, job.node_id, own)
    # the others are looked for outside the transaction, and only the one found is read (and so checked) in
    # it: every other step of a busy run committing meanwhile does not make the recovery decide again
    for node_id, data in (await store.read_all(job.run_id, NODES, lenient=True)).items():
        try:
            maybe = NodeRecord.from_json(data)
        except (ValueError, TypeError):
            continue  # (a corrupt record is not this step's: the run's own steps fail on it)
        if node_id != job.node_id and holds(maybe):
            rec = await read_node(t, node_id)
            if holds(rec):
                return _job_of(job.run_id, node_id, rec)
            # it moved on since the scan (what it claimed next is not in the scan): judged again later
            moved = True
    return None if moved else job


def _job_of(run_id: str, node_id: str, rec: NodeRecord) -> Job:
    """The job of a node's claimed step, as its record says it (firing, phase, attempt, recoveries)."""
    return Job(run_id, node_id, rec.seq, rec.current_phase.value, _attempt(rec), recovery=rec.recovery or 0)


def _attempt(rec: NodeRecord) -> int:
    """The attempt of a fired node. A record that has none was never fired and expects no job; meeting one
    here raises KeyError, as reading the field from the stored object always did."""
    if rec.attempt is None:
        raise KeyError("attempt")
    return rec.attempt


def _check_json(value: Any, what: str) -> None:
    try:
        check_json(value)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{what} is not JSON-serializable: {e}") from None
