"""Run semantics, written once (CONTRACT §5). Both runtimes drive this engine:

* ``runtime.FlowRuntime`` runs jobs as asyncio tasks over a ``MemoryStore``;
* the arq workers run each job as one arq job over a ``RedisStore``.

A job is one step of one node (see ``jobs.Job``). Handling a job is: *claim* it (a transaction that
checks the node still expects exactly this step, so duplicates and stale deliveries are no-ops), do the
work outside any transaction (the user's function, a batch expansion, a child run), then *commit* the
outcome in one transaction: the output, the node's context writes, its status and timing, the join
bookkeeping of its successors, dead-path skips, the jobs that follow (written to the run's outbox) and
the run's status. Nothing is half-done after a crash.

Joins count arrivals per (target, generation, source): a duplicate delivery cannot count twice, and a
loop ``continue`` starts a new generation of the loop body.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .blueprint import BREAK, CONTINUE, Blueprint, EdgeDef, JoinStrategy, NodeDef
from .errors import (
    BlueprintUnavailable,
    ExpressionEvalError,
    InvalidInput,
    NodeFailure,
    NodeTimeout,
    RunNotFound,
    StateConflict,
    UndecodableValue,
    json_type,
)
from .expressions import Expression
from .ids import check_run_id, child_run_id, field_name
from .jobs import Job
from .loading import loop_condition, parse_duration_ms
from .node_api import _MISSING, NodeContext, NodeResult, RunContext, SyncRunContext
from .registry import NodeRegistry
from .store import BATCH, JOINS, MISSING, NODES, OUTBOX, RUN, STATE, Store, Txn, dumps

log = logging.getLogger("flowcraft.engine")


class RunStatus(StrEnum):
    RUNNING = "running"
    AWAITING = "awaiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NodeStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SLEEPING = "sleeping"
    AWAITING = "awaiting"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"  # was waiting or running when its run was cancelled


FINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
RESTING_STATUSES = FINAL_STATUSES | {RunStatus.AWAITING}
_ACTIVE_NODE = frozenset({NodeStatus.QUEUED, NodeStatus.RUNNING, NodeStatus.SLEEPING, NodeStatus.AWAITING})
_META_FIELDS = ("status", "reason", "blueprint_id", "blueprint_version", "pending", "awaiting_nodes",
                "created_at", "finished_at", "parent", "failed_node", "version_wait_since", "keep_until",
                "ancestors", "queue")
_REF = object()  # "the source's output": resolved from _outputs.<source> when the target fires


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class EngineSettings:
    ttl_s: int = 86400  # how long a finished run's keys stay; 0 = forever
    running_ttl_s: int = 7 * 86400  # how long an unfinished run's keys live after its last step
    version_grace_s: float = 300.0
    # an attempt's limit when its node sets no ``timeout`` (workers: ``job_timeout_seconds``); None = none
    attempt_timeout_s: float | None = None


class Recovery(StrEnum):
    """What recovering a step of a dead (or dropped) claim found."""

    NOTHING = "nothing"  # the step already moved on: nothing to do
    UNKNOWN = "unknown"  # this worker cannot judge the run (blueprint or version not loaded): leave it
    REQUEUE = "requeue"  # the step was never claimed: queue the same job again
    RECOVERED = "recovered"  # a claimed step was lost: recorded, and a new job (a new id) scheduled


@dataclass(slots=True)
class Decision:
    """What a finished node does to each successor: taken (with the value it delivers) or not."""

    target: str
    taken: bool
    value: Any = _REF


@dataclass(slots=True)
class Route:
    """A finished node's decisions, and the expression errors met while making them (recorded as events)."""

    decisions: list[Decision]
    errors: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Handled:
    """What handling a job produced: jobs to queue (each with the run whose outbox holds it), or a
    request to try the same job again later (version gate)."""

    scheduled: list[tuple[str, Job]] = field(default_factory=list)
    retry_after_s: float | None = None
    note: str = ""
    failed: str | None = None  # the error of the node attempt this job ran, when it failed
    listed: bool = False  # the step is still listed under this worker (its claim's commit did not unlist it)


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
        self.draining = False  # set on shutdown: a cancelled step is handed back, not counted as failed
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
        parent: dict[str, Any] | None = None,
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
            above = (await self.store.read(parent["run_id"], RUN, ["ancestors"]))[0]
            ancestors = [*(above if isinstance(above, list) else []), parent["run_id"]]

        async def txn_fn(t: Txn) -> list[tuple[str, Job]]:
            if await t.get(RUN, "status") is not None:
                if parent is not None:
                    return []  # a redelivered subflow step: the child already exists
                raise InvalidInput(f"run id {run_id!r} already exists")
            ts = self.clock()
            for field_, value in {
                "status": RunStatus.RUNNING.value, "blueprint_id": bp.id, "blueprint_version": bp.version,
                "pending": 0, "awaiting_nodes": [], "created_at": ts, "parent": parent, "ancestors": ancestors,
            }.items():
                t.put(RUN, field_, value)
            for key, value in context_seed.items():
                t.put(STATE, str(key), value)
            t.put(STATE, "blueprintId", bp.id)
            t.put(STATE, "blueprintVersion", bp.version)
            t.event({"type": "run_started", "ts": ts, "blueprint_id": bp.id, "version": bp.version})
            t.started = bp
            run = _RunTxn(self, t, bp)
            for node_id in bp.start_nodes:
                await run.fire(node_id, run_input)
            await run.settle()
            return run.scheduled

        return run_id, await self.store.transact(run_id, txn_fn)

    async def resume(
        self, run_id: str, node_id: str | None = None, *, output: Any = None, action: str | None = None
    ) -> list[tuple[str, Job]]:
        """Give an awaiting ``wait`` node its output and action; routing follows the action."""
        _check_json(output, "resume output")
        meta = await self._read_meta(run_id)
        bp = await self._blueprint_for(meta, run_id)
        waiting = list(meta.get("awaiting_nodes") or [])
        if meta["status"] not in (RunStatus.AWAITING, RunStatus.RUNNING) or not waiting:
            raise StateConflict(f"run {run_id!r} is {meta['status']}, not awaiting a resume")
        if node_id is None:
            if len(waiting) > 1:
                raise InvalidInput(f"run {run_id!r} awaits several nodes ({', '.join(waiting)}): pass --node")
            node_id = waiting[0]
        if node_id not in bp.node_map:
            raise InvalidInput(f"run {run_id!r}: blueprint {bp.id!r} has no node {node_id!r}")
        if node_id not in waiting:
            raise StateConflict(f"node {node_id!r} of run {run_id!r} is not awaiting (awaiting: {', '.join(waiting)})")
        node = bp.node_map[node_id]
        _check_resume_action(bp, node_id, action)
        rec = (await self.store.read(run_id, NODES, [node_id]))[0]
        if rec is not MISSING and rec.get("child"):
            return await self._resume_child(run_id, bp, node_id, rec["child"], output, action)
        route = await self._decide(bp, node, run_id, output, action, {}, await self._node_input(bp, node, run_id))

        async def txn_fn(t: Txn) -> list[tuple[str, Job]]:
            run = _RunTxn(self, t, bp)
            m = await run.meta()
            rec = await t.get(NODES, node_id)
            if m["status"] not in (RunStatus.AWAITING, RunStatus.RUNNING) or not rec or rec["status"] != NodeStatus.AWAITING:
                raise StateConflict(f"node {node_id!r} of run {run_id!r} is no longer awaiting")
            run.set_meta("awaiting_nodes", [n for n in m["awaiting_nodes"] if n != node_id])
            run.set_meta("status", RunStatus.RUNNING.value)
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
        child_meta = await self._read_meta(child_id)
        waiting = list(child_meta.get("awaiting_nodes") or [])
        if child_meta["status"] != RunStatus.AWAITING:
            raise StateConflict(f"subflow node {node_id!r}: its child run {child_id!r} is {child_meta['status']}, "
                                "not awaiting")
        if len(waiting) != 1:
            raise InvalidInput(f"subflow node {node_id!r} waits in child run {child_id!r} on "
                               f"{', '.join(waiting) or 'nothing'}: resume the child run itself")
        # refuse a bad action before the parent changes: a refused resume must leave the parent awaiting
        _check_resume_action(await self._blueprint_for(child_meta, child_id), waiting[0], action)
        woken: dict[str, Any] = {}

        async def txn_fn(t: Txn) -> None:
            run = _RunTxn(self, t, bp)
            m = await run.meta()
            rec = await t.get(NODES, node_id)
            if not rec or rec["status"] != NodeStatus.AWAITING:
                raise StateConflict(f"node {node_id!r} of run {run_id!r} is no longer awaiting")
            woken.update({**rec, "status": NodeStatus.RUNNING.value})
            t.put(NODES, node_id, woken)
            run.set_meta("awaiting_nodes", [n for n in m["awaiting_nodes"] if n != node_id])
            run.set_meta("status", RunStatus.RUNNING.value)
            run.add_pending(1)

        async def undo(t: Txn) -> None:
            run = _RunTxn(self, t, bp)
            m = await run.meta()
            if await t.get(NODES, node_id) != woken or m["status"] != RunStatus.RUNNING:
                return  # the node moved on meanwhile (the child ended and told it): nothing to put back
            t.put(NODES, node_id, {**woken, "status": NodeStatus.AWAITING.value})
            run.set_meta("awaiting_nodes", [*(m["awaiting_nodes"] or []), node_id])
            run.add_pending(-1)
            if int(m["pending"] or 0) == 0:
                run.set_meta("status", RunStatus.AWAITING.value)

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
        meta = await self._read_meta(run_id)
        bp = await self._blueprint_for(meta, run_id)

        async def txn_fn(t: Txn) -> tuple[bool, list[tuple[str, str, dict[str, Any]]], list[tuple[str, Job]]]:
            run = _RunTxn(self, t, bp)
            m = await run.meta()
            if m["status"] in FINAL_STATUSES:
                return False, [], []
            nodes = await t.get_all(NODES)
            # each child with the parent reference its start writes (as _Step._subflow builds it)
            children = [(r["child"], str(bp.node_map[n].params.get("blueprintId")),
                         {"run_id": run_id, "node_id": n, "seq": r["seq"], "attempt": r["attempt"]})
                        for n, r in nodes.items()
                        if r.get("child") and r["status"] in (NodeStatus.RUNNING, NodeStatus.AWAITING)]
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
        meta = await self._read_meta(run_id)
        bp = await self._blueprint_for(meta, run_id)
        if meta["status"] != RunStatus.FAILED:
            raise StateConflict(f"run {run_id!r} is {meta['status']}; only a failed run can be retried")
        if meta.get("parent"):
            raise StateConflict(f"run {run_id!r} is a subflow of run {meta['parent']['run_id']!r}: retry that run")
        if bp.version != meta["blueprint_version"]:
            raise StateConflict(f"run {run_id!r} ran blueprint {bp.id!r} version {meta['blueprint_version']!r}; "
                                f"this one has version {bp.version!r}")

        async def txn_fn(t: Txn) -> list[tuple[str, Job]]:
            run = _RunTxn(self, t, bp)
            m = await run.meta()
            if m["status"] != RunStatus.FAILED:
                raise StateConflict(f"run {run_id!r} is {m['status']}; only a failed run can be retried")
            records = await t.get_all(NODES)
            again = [n.id for n in bp.nodes if (rec := records.get(n.id)) and rec["status"] == NodeStatus.FAILED
                     and (n.id == m.get("failed_node") or str(rec.get("error") or "").startswith("stopped: "))]
            if not again:
                raise StateConflict(f"run {run_id!r} has no failed node to run again")
            ts = self.clock()
            reset: dict[str, Any] = {"status": RunStatus.RUNNING.value, "reason": None, "finished_at": None,
                                     "failed_node": None, "awaiting_nodes": [], "pending": 0}
            for key, value in reset.items():
                run.set_meta(key, value)
            t.unfinal = True
            t.event({"type": "run_retried", "ts": ts, "nodes": again})
            for node_id in again:
                rec = records[node_id]
                # the node's record starts over as never fired in this generation, its busy count undone
                t.put(NODES, node_id, {**rec, "status": NodeStatus.PENDING.value, "error": None,
                                       "fired_gen": rec.get("gen", 0) - 1, "token": None, "job": None,
                                       "child": None, "items": None, "phase": "exec", "lost_in_row": 0,
                                       "recovery": 0})
                await run._count_busy(node_id, -1)
                node_input: Any = await t.get(STATE, f"_inputs.{node_id}")
                await run.fire(node_id, node_input)
            # nodes still counted busy or pending from before the failure are the ones just fired
            pending = sum(1 for r in (await t.get_all(NODES)).values()
                          if r["status"] in (NodeStatus.QUEUED, NodeStatus.RUNNING, NodeStatus.SLEEPING))
            run.set_meta("pending", pending)
            await run.settle()
            return run.scheduled

        return await self.store.transact(run_id, txn_fn)

    async def _tombstone(self, run_id: str, blueprint_id: str, reason: str, parent: dict[str, Any]) -> bool:
        """A child the parent recorded but had not created yet: create it as cancelled (with the parent its
        start would write), so the step that was about to start it finds it exists and starts nothing.
        Returns False when the run exists already (its start won the race)."""
        async def fn(t: Txn) -> bool:
            if await t.get(RUN, "status") is not None:
                return False
            for key, value in {"status": RunStatus.CANCELLED.value, "reason": reason,
                               "blueprint_id": blueprint_id, "blueprint_version": "", "pending": 0,
                               "awaiting_nodes": [], "finished_at": self.clock(), "parent": parent}.items():
                t.put(RUN, key, value)
            t.final = ({"status": RunStatus.CANCELLED.value, "reason": reason, "payload": None},
                       self.settings.ttl_s)
            return True
        return await self.store.transact(run_id, fn)

    async def expected_jobs(self, run_id: str) -> tuple[list[Job], list[str], list[tuple[Job, str]]]:
        """Every step a running run is waiting for, as the jobs that would carry them: its outbox, and each
        queued, sleeping or batch step. The reconciler queues those whose job is gone; queueing one that
        still exists is a no-op (same job id), and a stale one is dropped at its claim. Also returns the
        outbox entries read, which the caller may clear once it has queued what they stand for, and the
        claimed steps no live worker holds any more, as (claim job, worker): ``recover`` those."""
        meta = await self._find_meta(run_id)
        if meta is None:
            return [], [], []
        running = meta["status"] == RunStatus.RUNNING
        if running:
            await self._blueprint_for(meta, run_id)  # a run no loaded blueprint describes cannot be resumed from here
        jobs: dict[str, Job] = {}
        lost: list[tuple[Job, str]] = []
        live = running or meta["status"] == RunStatus.AWAITING
        records = await self.store.read_all(run_id, NODES) if live else {}
        outbox = await self.store.read_all(run_id, OUTBOX)
        for data in outbox.values():
            job = Job.from_dict(data)
            rec = records.get(job.node_id) if job.run_id == run_id else None
            # a finished child's note to its parent always counts; a step of this run only while expected (an
            # awaiting node expects no job of its own: its resume or its child's note moves it)
            if job.run_id != run_id or (rec and rec.get("seq") == job.seq and rec["status"] in _ACTIVE_NODE
                                        and rec["status"] != NodeStatus.AWAITING):
                jobs[job.job_id] = job  # else: the step already happened; a leftover entry, not a lost job
        if meta["status"] == RunStatus.AWAITING and (parent := meta.get("parent")):
            # a waiting child tells its parent (idempotent), in case that note was lost: the parent's node
            # still runs this child (once told, it awaits too)
            prec = (await self.store.read(parent["run_id"], NODES, [parent["node_id"]]))[0]
            if prec is not MISSING and prec.get("seq") == parent["seq"] and prec["status"] == NodeStatus.RUNNING:
                wait = Job(parent["run_id"], parent["node_id"], parent["seq"], "child_wait", parent["attempt"])
                jobs[wait.job_id] = wait
        for node_id, rec in records.items():
            status, seq, phase = rec["status"], rec.get("seq", 0), rec.get("phase", "exec")
            found: list[Job] = []
            if status == NodeStatus.QUEUED:
                found.append(Job(run_id, node_id, seq, phase, rec["attempt"], not_before_ms=rec.get("retry_at") or 0,
                                 recovery=rec.get("recovery", 0)))
            elif status == NodeStatus.SLEEPING:
                found.append(Job(run_id, node_id, seq, "wake", 1, not_before_ms=rec.get("wake_at") or 0))
            elif status in (NodeStatus.RUNNING, NodeStatus.AWAITING) and rec.get("child"):
                if (st := await self.store.read_status(rec["child"])) and st["status"] in FINAL_STATUSES:
                    found.append(Job(run_id, node_id, seq, "child", rec["attempt"]))
                elif status == NodeStatus.RUNNING and (
                        (cm := await self._find_meta(rec["child"])) and cm["status"] == RunStatus.AWAITING):
                    found.append(Job(run_id, node_id, seq, "child_wait", rec["attempt"]))
            elif status == NodeStatus.RUNNING and rec.get("items") is not None:
                n, done = await self.store.read(run_id, BATCH, [field_name(node_id, seq, "n"),
                                                                field_name(node_id, seq, "done")])
                if done is not MISSING and n is not MISSING and done >= n:
                    found.append(Job(run_id, node_id, seq, "gather", 1))
                else:
                    states = await self.store.read(run_id, BATCH, [field_name(node_id, seq, "s", i)
                                                                for i in range(int(n or 0))])
                    for i, st in enumerate(states):
                        if st is MISSING:
                            continue
                        item_job = Job(run_id, node_id, seq, "item", st["attempt"], item=i,
                                       recovery=st.get("recovery", 0))
                        if st["status"] == "queued":
                            found.append(item_job)
                        elif st["status"] == "running" and not await self._held(st):
                            lost.append((item_job, st.get("worker") or ""))
            elif status == NodeStatus.RUNNING and rec.get("token") and not await self._held(rec):
                lost.append((Job(run_id, node_id, seq, phase, rec["attempt"], recovery=rec.get("recovery", 0)),
                             rec.get("worker") or ""))
            for job in found:
                jobs.setdefault(job.job_id, job)
        return list(jobs.values()), list(outbox), lost

    # ------------------------------------------------------------------ handling one job

    async def handle(self, job: Job) -> Handled:
        meta = await self._find_meta(job.run_id)
        if meta is None:
            log.warning("job %s: run %r does not exist (expired or never started); dropped", job.job_id, job.run_id)
            return Handled(note="unknown run")
        if meta["status"] in FINAL_STATUSES:
            return Handled(note=f"run is {meta['status']}")
        bp = self.blueprints.get(meta["blueprint_id"])
        if bp is None or bp.version != meta["blueprint_version"]:
            return await self._version_gate(job, meta, bp)
        node = bp.node_map.get(job.node_id)
        if node is None:
            log.error("job %s: node %r is not in blueprint %r; dropped", job.job_id, job.node_id, bp.id)
            return Handled(note="unknown node")
        if meta.get("version_wait_since") is not None:
            await self._clear_version_wait(job.run_id)  # a matching worker is here: the grace clock restarts
        step = _Step(self, bp, node, job)
        scheduled = await step.run()
        if step.held_elsewhere:
            # a live worker runs this very step (a duplicate delivery): it commits, or, should it die, the
            # step is recovered from its worker's list; this copy has nothing to do
            return Handled(note="held elsewhere")
        return Handled(scheduled=scheduled, note="stale" if step.stale else "", failed=step.failure,
                       listed=step.listed)

    async def _held(self, holder: Mapping[str, Any]) -> bool:
        """Is a claim (a node record or a batch item) still held by a live step? This process's own claims
        are held while their step runs here (one that died with a Redis error and was handed back is not);
        another worker's while that worker is alive and still lists the step (CONTRACT §6.1)."""
        token, worker = holder.get("token"), holder.get("worker")
        if not token:
            return False
        if worker == self.worker_id:
            return token in self.active_tokens
        if self.is_held_remote is None or not worker or not holder.get("job"):
            return False
        return await self.is_held_remote(worker, holder["job"])

    async def recover(self, job: Job, worker: str, *, lost: bool = True) -> tuple[Recovery, list[tuple[str, Job]]]:
        """Recover a step that ``worker`` was running and no longer holds (it died, was cut off past its
        lease, or dropped the step after a Redis error). A step still waiting for its claim is queued again as
        it is; a claimed one becomes a new job (recovery + 1, so a new id) and, when ``lost``, its attempt is
        recorded as lost. ``maxRetries`` lost attempts in a row fail the node: one that kills its worker every
        time must end. Serialized with every commit of the run, so a step that did commit meanwhile is
        left alone, and a worker that comes back later finds its claim gone (fenced off)."""
        meta = await self._find_meta(job.run_id)
        if meta is None or meta["status"] in FINAL_STATUSES:
            return Recovery.NOTHING, []
        bp = await self._find_blueprint(meta)
        if bp is None or bp.version != meta["blueprint_version"]:
            return Recovery.UNKNOWN, []  # a worker with this blueprint version recovers it
        node = bp.node_map.get(job.node_id)
        if node is None:
            return Recovery.NOTHING, []
        if job.kind not in ("exec", "fallback", "item"):
            return Recovery.REQUEUE, []  # gather, wake, child: claim nothing; they check their own state
        async def decide(run: _RunTxn, t: Txn) -> Recovery:
            if (await run.meta())["status"] in FINAL_STATUSES:
                return Recovery.NOTHING
            rec = await t.get(NODES, node.id)
            if not rec or rec["seq"] != job.seq:
                return Recovery.NOTHING
            if job.kind == "item":
                if rec["status"] != NodeStatus.RUNNING or rec.get("phase", "exec") != "exec" \
                        or rec.get("items") is None:
                    return Recovery.NOTHING  # the batch node moved on (finished, failed over to its fallback)
                key = field_name(node.id, job.seq, "s", job.item)
                st = await t.get(BATCH, key)
                if not st or st["attempt"] != job.attempt or st.get("recovery", 0) != job.recovery:
                    return Recovery.NOTHING
                if st["status"] == "queued":
                    return Recovery.REQUEUE
                if st["status"] != "running" or st.get("worker") != worker or st.get("job") != job.job_id \
                        or await self._held(st):
                    return Recovery.NOTHING
                failed = False
                if lost:
                    st, failed = await run.lose_item(node, rec, st, job, worker)
                if not failed:
                    t.put(BATCH, key, {"status": "queued", "attempt": job.attempt, "recovery": job.recovery + 1,
                                       "lost_in_row": st.get("lost_in_row", 0)})
                    run.schedule(Job(job.run_id, node.id, job.seq, "item", job.attempt, item=job.item,
                                     recovery=job.recovery + 1))
                await run.settle()
                return Recovery.RECOVERED
            if rec.get("phase", "exec") != job.kind or rec["attempt"] != job.attempt \
                    or rec.get("recovery", 0) != job.recovery:
                return Recovery.NOTHING
            if rec["status"] == NodeStatus.QUEUED:
                return Recovery.REQUEUE
            if rec["status"] != NodeStatus.RUNNING or rec.get("worker") != worker or rec.get("job") != job.job_id \
                    or await self._held(rec):
                return Recovery.NOTHING
            redo = Job(job.run_id, node.id, job.seq, job.kind, job.attempt, recovery=job.recovery + 1)
            if rec.get("child") or rec.get("items") is not None:
                # the attempt's work lives on (a child run, batch items): drive it again, lose nothing
                t.put(NODES, node.id, {**rec, "recovery": job.recovery + 1})
                run.schedule(redo)
                return Recovery.RECOVERED
            failed = False
            if lost:
                rec, failed = await run.lose_attempt(node, rec, job, worker)
            if not failed:
                t.put(NODES, node.id, {**rec, "status": NodeStatus.QUEUED.value, "token": None, "job": None,
                                       "recovery": job.recovery + 1})
                run.schedule(redo)
            await run.settle()
            return Recovery.RECOVERED

        async def fn(t: Txn) -> tuple[Recovery, list[tuple[str, Job]]]:
            run = _RunTxn(self, t, bp)
            outcome = await decide(run, t)
            return outcome, run.scheduled

        return await self.store.transact(job.run_id, fn)

    async def _clear_version_wait(self, run_id: str) -> None:
        async def fn(t: Txn) -> None:
            if await t.get(RUN, "version_wait_since") is not None:
                t.put(RUN, "version_wait_since", None)
        await self.store.transact(run_id, fn)

    async def _version_gate(self, job: Job, meta: dict[str, Any], bp: Blueprint | None) -> Handled:
        """A worker without the run's blueprint version leaves the job to one that has it; after the grace
        period the run fails, naming both versions."""
        mine = "no such blueprint" if bp is None else f"version {bp.version!r}"
        theirs = f"blueprint {meta['blueprint_id']!r} version {meta['blueprint_version']!r}"
        since = meta.get("version_wait_since")
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
                           note="version mismatch")
        reason = (f"no worker with {theirs} took node {job.node_id!r} within "
                  f"{self.settings.version_grace_s:g}s (this worker has {mine})")
        fake_bp = bp or Blueprint(id=meta["blueprint_id"], nodes=(), edges=())

        async def fail(t: Txn) -> None:
            run = _RunTxn(self, t, fake_bp)
            if (await run.meta())["status"] not in FINAL_STATUSES:
                await run.finalize(RunStatus.FAILED, reason)
        await self.store.transact(job.run_id, fail)
        return Handled(note="version grace expired")

    # ------------------------------------------------------------------ helpers shared by steps

    async def _find_meta(self, run_id: str) -> dict[str, Any] | None:
        values = await self.store.read(run_id, RUN, list(_META_FIELDS))
        meta = {k: (None if v is MISSING else v) for k, v in zip(_META_FIELDS, values, strict=True)}
        return None if meta["status"] is None else meta

    async def _read_meta(self, run_id: str) -> dict[str, Any]:
        meta = await self._find_meta(run_id)
        if meta is None:
            raise RunNotFound(f"run {run_id!r} not found (it never existed or its keys expired)")
        return meta

    async def _blueprint_for(self, meta: dict[str, Any], run_id: str) -> Blueprint:
        bp = await self._find_blueprint(meta)
        if bp is None:
            where = "not loaded here, and its definition is not in the store" if self.load_definition else "not loaded"
            raise BlueprintUnavailable(f"run {run_id!r} uses blueprint {meta['blueprint_id']!r}, which is {where}")
        return bp

    async def _find_blueprint(self, meta: dict[str, Any]) -> Blueprint | None:
        """The blueprint a run was started with: the loaded one at the run's version, else the run's own
        definition (``load_definition``), else the loaded one at another version. Only for what a client
        does to a run (cancel, resume, reconcile, recover a lost step); a step runs on its worker's own
        blueprint, behind the version gate."""
        bp = self.blueprints.get(meta["blueprint_id"])
        version = meta.get("blueprint_version") or ""
        if (bp is None or bp.version != version) and self.load_definition is not None and version:
            stored = await self.load_definition(meta["blueprint_id"], version)
            if stored is not None:
                return stored
        return bp

    async def _read_context(self, run_id: str, key: str) -> Any:
        return (await self.store.read(run_id, STATE, [key]))[0]

    async def _resolve_ref(self, run_id: str, ref: str) -> Any:
        """A node's ``inputs`` reference: ``_raw`` key, ``node.path`` (a node output, else a context
        key), or a node id (its output, else the context key of that name)."""
        if ref.startswith("_"):
            v = await self._read_context(run_id, ref)
            return None if v is MISSING else v
        base, _, path = ref.partition(".")
        out, ctx = await self.store.read(run_id, STATE, [f"_outputs.{base}", base])
        value = out if out is not MISSING else ctx
        if value is MISSING:
            return None
        for part in path.split(".") if path else ():
            if isinstance(value, Mapping):
                value = value.get(part)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return None
        return value

    async def _node_input(self, bp: Blueprint, node: NodeDef, run_id: str) -> Any:
        if isinstance(node.inputs, str):
            return await self._resolve_ref(run_id, node.inputs)
        if isinstance(node.inputs, Mapping):
            return {k: await self._resolve_ref(run_id, v) for k, v in node.inputs.items()}
        v = await self._read_context(run_id, f"_inputs.{node.id}")
        return None if v is MISSING else v

    async def _scope(self, run_id: str, names: set[str], base: dict[str, Any], writes: Mapping[str, Any]) -> dict[str, Any]:
        """The names an expression may read: ``result``, ``input``, ``context``, ``outputs`` and every
        context key at top level. Only what the expressions name is read from the store."""
        wanted = names - base.keys()
        if not wanted:
            return base
        if "context" in wanted or "outputs" in wanted:
            ctx = await self.store.read_all(run_id, STATE)
        else:
            ctx = {k: v for k, v in zip(wanted, await self.store.read(run_id, STATE, list(wanted)), strict=True)
                   if v is not MISSING}
        for k, v in writes.items():
            if v is _MISSING:
                ctx.pop(k, None)
            else:
                ctx[k] = v
        scope = dict(ctx)
        if "context" in wanted:
            scope["context"] = ctx
        if "outputs" in wanted:
            scope["outputs"] = {k[len("_outputs."):]: v for k, v in ctx.items() if k.startswith("_outputs.")}
        scope.update(base)
        return scope

    async def _decide(
        self,
        bp: Blueprint,
        node: NodeDef,
        run_id: str,
        output: Any,
        action: str | None,
        writes: Mapping[str, Any],
        node_input: Any,
        edges: Iterable[EdgeDef] | None = None,
    ) -> Route:
        """CONTRACT §5.4: the action's edges whose condition holds; if none, the default edges whose
        condition holds. Every other edge is not taken. A transform that fails counts as not taken."""
        edges = list(bp.out_edges[node.id] if edges is None else edges)
        if not edges:
            return Route([])
        names: set[str] = set()
        for e in edges:
            for expr in (e.condition, e.transform):
                if expr is not None:
                    names |= set(expr.names)
        base = {"result": {"output": output, "action": action}, "input": node_input}
        scope = await self._scope(run_id, names, base, writes)
        events: list[str] = []

        def holds(e: EdgeDef) -> bool:
            if e.condition is None:
                return True
            try:
                return bool(e.condition.evaluate(scope))
            except ExpressionEvalError as err:
                events.append(f"edge {e.source}->{e.target} condition {e.condition.source!r}: {err}")
                return False

        chosen = [e for e in edges if action is not None and e.action == action and holds(e)]
        if not chosen:
            chosen = [e for e in edges if e.action is None and holds(e)]
        return _aggregate(edges, chosen, scope, output, events, node.id, run_id)


def _aggregate(
    edges: list[EdgeDef], chosen: list[EdgeDef], scope: dict[str, Any], output: Any, events: list[str],
    node_id: str, run_id: str,
) -> Route:
    """One decision per distinct target: taken if any edge to it was taken (first taken edge's value)."""
    by_target: dict[str, Decision] = {}
    chosen_ids = {id(e) for e in chosen}
    for e in edges:
        d = by_target.setdefault(e.target, Decision(e.target, False))
        if d.taken or id(e) not in chosen_ids:
            continue
        value: Any = _REF
        if e.transform is not None:
            try:
                value = e.transform.evaluate({**scope, "input": output})
            except ExpressionEvalError as err:
                events.append(f"edge {e.source}->{e.target} transform {e.transform.source!r}: {err}")
                continue
        d.taken, d.value = True, value
    for msg in events:
        log.info("run %s node %s: %s (counts as not taken)", run_id, node_id, msg)
    return Route(list(by_target.values()), events)


def _count_field(tgt: str, gen: int) -> str:
    """A join's ``[decided, taken]`` count: a bare ``#`` part, which no escaped source id can be."""
    return field_name(tgt, gen) + "|#"


def _check_resume_action(bp: Blueprint, node_id: str, action: str | None) -> None:
    """A resume's action must match an edge of the node when every edge of it has an action."""
    edges = bp.out_edges[node_id]
    actions = sorted({e.action for e in edges if e.action})
    if action is not None and actions and action not in actions and all(e.action for e in edges):
        import difflib

        close = difflib.get_close_matches(action, actions, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidInput(f"action {action!r} matches no edge of node {node_id!r} ({hint}its actions: "
                           f"{', '.join(actions)})")


def _check_json(value: Any, what: str) -> str:
    try:
        return dumps(value)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{what} is not JSON-serializable: {e}") from None


def _json_problem(value: Any) -> str | None:
    try:
        dumps(value)
        return None
    except (TypeError, ValueError):
        return _first_bad_type(value)


def _first_bad_type(value: Any) -> str:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
            if any(not isinstance(k, str | int | float | bool) and k is not None for k in v):
                return "dict key"
        elif isinstance(v, list | tuple):
            stack.extend(v)
        elif not isinstance(v, str | int | float | bool) and v is not None:
            return type(v).__name__
    return "value"


class _RunTxn:
    """Engine operations inside one transaction of one run."""

    def __init__(self, engine: Engine, t: Txn, bp: Blueprint) -> None:
        self.engine = engine
        self.t = t
        self.bp = bp
        t.blueprint_id = bp.id
        self.scheduled: list[tuple[str, Job]] = []
        self._meta: dict[str, Any] | None = None

    async def meta(self) -> dict[str, Any]:
        if self._meta is None:
            got = await self.t.get_many(RUN, _META_FIELDS)
            self._meta = {k: got.get(k) for k in _META_FIELDS}
            self._extend_expiry(self._meta.get("keep_until"))
            self.t.ancestors = list(self._meta.get("ancestors") or [])  # they live as long as this run
        return self._meta

    def _extend_expiry(self, keep_until: int | None) -> None:
        """An unfinished run's keys live ``running_ttl_s`` past its last step, and past any wake-up it still
        waits for (a sleep longer than that must not find its run expired)."""
        if keep_until:
            running = self.engine.settings.running_ttl_s
            extra_s = max(0, (keep_until - self.engine.clock()) // 1000 + 1)
            self.t.ttl_s = running + extra_s if running > 0 else 0

    def set_meta(self, key: str, value: Any) -> None:
        assert self._meta is not None
        self._meta[key] = value
        self.t.put(RUN, key, value)

    def add_pending(self, delta: int) -> None:
        assert self._meta is not None
        self.set_meta("pending", int(self._meta["pending"] or 0) + delta)

    def schedule(self, job: Job, owner: str | None = None) -> None:
        """Write the job to the outbox of the run whose transaction this is; the driver queues it after
        the commit and then deletes the outbox entry (a crash in between leaves it for the reconciler)."""
        self.t.put(OUTBOX, job.job_id, job.to_dict())
        self.scheduled.append((self.t.run_id, job))

    # ---- firing, skipping, joins

    async def fire(self, node_id: str, value: Any, *, loop_entry: bool = False) -> None:
        """Make a node ready: write its input, queue its first attempt."""
        await self.meta()
        rec = await self.t.get(NODES, node_id)
        seq = (rec["seq"] if rec else 0) + 1
        gen = rec["gen"] if rec else 0
        new = {"status": NodeStatus.QUEUED.value, "seq": seq, "gen": gen, "fired_gen": gen, "attempt": 1,
               "phase": "exec", "queued_at": self.engine.clock(), "runs": (rec or {}).get("runs", 0)}
        if self.bp.is_loop_controller(node_id):
            new["iter"] = 0 if (loop_entry or not rec) else rec.get("iter", 0)
            new["busy"] = (rec or {}).get("busy", 0)
        self.t.put(NODES, node_id, new)
        self.t.put(STATE, f"_inputs.{node_id}", value)
        self.add_pending(1)
        await self._count_busy(node_id, +1)
        self.schedule(Job(self.t.run_id, node_id, seq))

    async def _count_busy(self, node_id: str, delta: int) -> None:
        """Each loop-controller counts the body nodes fired and not yet finished, so telling whether its body
        is idle costs one read, not a read of the whole body."""
        for controller in self.bp.loops_containing.get(node_id, ()):
            rec = await self.t.get(NODES, controller) or {"seq": 0, "runs": 0, "gen": 0, "status": "pending"}
            self.t.put(NODES, controller, {**rec, "busy": max(0, rec.get("busy", 0) + delta)})

    async def arrive(self, source: str, decisions: list[Decision]) -> None:
        """Deliver a finished node's decisions; fire or skip successors whose join is now decided.
        Iterative (not recursive) so a skip can run down a 10,000-node chain."""
        await self._drain(deque((source, d) for d in decisions))

    async def _drain(self, work: deque[tuple[str, Decision]]) -> None:
        loop_backs: deque[tuple[str, Decision]] = deque()
        while work or loop_backs:
            if not work:
                # loop-backs last: the body's other successors of this step must be fired first, so that the
                # controller sees the body busy and holds the next iteration until they finish
                work.append(loop_backs.popleft())
                src, d = work.popleft()
                node = self.bp.node_map[d.target]
                rec = await self.t.get(NODES, d.target)
                await self._arrive_loop(src, d, node, rec, rec["gen"] if rec else 0, work)
                continue
            src, d = work.popleft()
            tgt = d.target
            node = self.bp.node_map[tgt]
            if node.uses == "loop-controller" and src not in self.bp.loop_entry_sources[tgt]:
                loop_backs.append((src, d))
                continue
            rec = await self.t.get(NODES, tgt)
            gen = rec["gen"] if rec else 0
            if node.uses == "loop-controller":
                await self._arrive_loop(src, d, node, rec, gen, work)
                continue
            if rec and rec.get("fired_gen", gen if rec["status"] != NodeStatus.PENDING else -1) == gen:
                continue  # already fired or skipped in this generation: a duplicate or late arrival
            counts = await self._record_arrival(tgt, gen, src, d)
            if counts is None:
                continue
            if rec and rec["status"] in _ACTIVE_NODE:
                continue  # still busy with the previous loop iteration: its completion looks at this join
            await self._decide_join(tgt, node, rec, gen, counts, (src, d) if d.taken else None, work)

    async def _decide_join(self, tgt: str, node: NodeDef, rec: dict | None, gen: int, counts: tuple[int, int],
                           trigger: tuple[str, Decision] | None, work: deque[tuple[str, Decision]]) -> None:
        """``any``: fire on a taken arrival; ``all``: once every predecessor decided, fire if one was taken,
        else skip (and the skip travels on)."""
        decided, taken = counts
        if node.config.join_strategy == JoinStrategy.ANY and taken:
            if trigger is None:  # re-checked after a busy node finished: any taken arrival will do
                arrivals = await self.t.get_many(JOINS, [field_name(tgt, gen, p) for p in self.bp.predecessors[tgt]])
                src = next(p for p in self.bp.predecessors[tgt] if arrivals.get(field_name(tgt, gen, p), {}).get("t"))
                trigger = (src, Decision(tgt, True, arrivals[field_name(tgt, gen, src)].get("v", _REF)))
            await self.fire(tgt, await self._value_of(*trigger))
        elif decided >= len(self.bp.predecessors[tgt]):
            if taken:
                await self.fire(tgt, await self._join_input(tgt, gen, node))
            else:
                self._skip(tgt, rec, gen, work)

    async def recheck_join(self, node_id: str) -> None:
        """A node that finished after a loop ``continue`` moved it to a new generation: the arrivals of
        that generation may already decide it."""
        rec = await self.t.get(NODES, node_id)
        if not rec or rec.get("fired_gen", rec["gen"]) == rec["gen"] or rec["status"] in _ACTIVE_NODE:
            return
        gen = rec["gen"]
        counts = await self.t.get(JOINS, _count_field(node_id, gen))
        if counts:
            work: deque[tuple[str, Decision]] = deque()
            await self._decide_join(node_id, self.bp.node_map[node_id], rec, gen, tuple(counts), None, work)
            await self._drain(work)

    async def _record_arrival(self, tgt: str, gen: int, src: str, d: Decision) -> tuple[int, int] | None:
        key = field_name(tgt, gen, src)
        if await self.t.get(JOINS, key) is not None:
            return None  # this predecessor already arrived in this generation
        self.t.put(JOINS, key, {"t": d.taken} if d.value is _REF or not d.taken else {"t": True, "v": d.value})
        decided, taken = await self.t.get(JOINS, _count_field(tgt, gen), [0, 0])
        counts = (decided + 1, taken + int(d.taken))
        self.t.put(JOINS, _count_field(tgt, gen), list(counts))
        return counts

    async def _arrive_loop(self, src: str, d: Decision, node: NodeDef, rec: dict | None, gen: int,
                           work: deque[tuple[str, Decision]]) -> None:
        """A loop-controller runs on every taken arrival (entry or loop-back). It is skipped only when all
        its entry edges were not taken; a loop-back that is not taken changes nothing."""
        entry = src in self.bp.loop_entry_sources[node.id]
        status = rec["status"] if rec else NodeStatus.PENDING
        if d.taken:
            if status in (NodeStatus.QUEUED, NodeStatus.RUNNING):
                self.t.event({"type": "loop_arrival_ignored", "ts": self.engine.clock(), "node": node.id,
                              "source": src, "why": "the controller is already running"})
                return
            if not entry and await self._body_busy(node.id):
                # iterations do not overlap: the next one starts when every node of this one rests
                held = {"src": src, **({} if d.value is _REF else {"v": d.value})}
                self.t.put(NODES, node.id, {**(rec or {"seq": 0, "runs": 0}), "held": held})
                return
            if entry:
                await self._record_arrival(node.id, gen, src, d)
            await self.fire(node.id, await self._value_of(src, d), loop_entry=entry)
        elif entry and status == NodeStatus.PENDING:
            counts = await self._record_arrival(node.id, gen, src, d)
            if counts and counts[0] >= len(self.bp.loop_entry_sources[node.id]) and counts[1] == 0:
                self._skip(node.id, rec, gen, work)

    async def _body_busy(self, controller: str) -> bool:
        """A body node still running, or an inner loop whose own next iteration is waiting, keeps it busy."""
        rec = await self.t.get(NODES, controller)
        if rec and rec.get("busy", 0) > 0:
            return True
        inner = await self.t.get_many(NODES, self.bp.inner_loops[controller])
        return any(r.get("held") for r in inner.values())

    async def release_held_loops(self, node_id: str) -> None:
        """A loop-back arrival waits while its body is busy; the last body node to finish lets it in."""
        for controller in self.bp.loops_containing.get(node_id, ()):
            rec = await self.t.get(NODES, controller)
            if not rec or not rec.get("held") or rec["status"] in _ACTIVE_NODE or await self._body_busy(controller):
                continue
            held = rec["held"]
            self.t.put(NODES, controller, {**rec, "held": None})
            src = held["src"]
            value = held["v"] if "v" in held else await self.t.get(STATE, f"_outputs.{src}")
            await self.fire(controller, value)

    def _skip(self, node_id: str, rec: dict | None, gen: int, work: deque[tuple[str, Decision]]) -> None:
        self.t.put(NODES, node_id, {**(rec or {"seq": 0, "runs": 0}), "status": NodeStatus.SKIPPED.value, "gen": gen,
                                    "fired_gen": gen})
        for tgt in dict.fromkeys(e.target for e in self.bp.out_edges[node_id]):
            work.append((node_id, Decision(tgt, False)))

    async def _value_of(self, src: str, d: Decision) -> Any:
        if d.value is not _REF:
            return d.value
        return await self.t.get(STATE, f"_outputs.{src}")

    async def _join_input(self, tgt: str, gen: int, node: NodeDef) -> Any:
        """A single predecessor delivers its value; several deliver ``{source_id: value}`` of the edges
        that were taken."""
        preds = self.bp.predecessors[tgt]
        arrivals = await self.t.get_many(JOINS, [field_name(tgt, gen, p) for p in preds])
        taken = [(p, arrivals[field_name(tgt, gen, p)]) for p in preds if arrivals.get(field_name(tgt, gen, p), {}).get("t")]
        refs = await self.t.get_many(STATE, [f"_outputs.{p}" for p, a in taken if "v" not in a])
        values = {p: (a["v"] if "v" in a else refs.get(f"_outputs.{p}")) for p, a in taken}
        if len(preds) == 1:
            return next(iter(values.values()))
        return values

    async def reset_loop_body(self, controller: str) -> None:
        """``continue``: every node of the body starts a new generation. Arrivals from outside the body
        carry over (they happened once, before the loop); nodes still active are left alone."""
        body = self.bp.loop_bodies[controller]
        recs = await self.t.get_many(NODES, body)
        for node_id in body:
            rec = recs.get(node_id)
            old_gen = rec["gen"] if rec else 0
            new_gen = old_gen + 1
            if rec and rec["status"] in _ACTIVE_NODE:
                continue  # cannot happen through the loop-back, which waits for an idle body
            base = rec or {"seq": 0, "runs": 0, "fired_gen": -1}
            self.t.put(NODES, node_id, {**base, "gen": new_gen, "status": NodeStatus.PENDING.value, "held": None})
            outside = [p for p in self.bp.predecessors[node_id] if p not in body and p != controller]
            old = await self.t.get_many(JOINS, [field_name(node_id, old_gen, p) for p in self.bp.predecessors[node_id]])
            decided = taken = 0
            for p in outside:
                a = old.get(field_name(node_id, old_gen, p))
                if a is not None:
                    self.t.put(JOINS, field_name(node_id, new_gen, p), a)
                    decided += 1
                    taken += int(bool(a.get("t")))
            if decided:
                self.t.put(JOINS, _count_field(node_id, new_gen), [decided, taken])
            for key in old:
                self.t.delete(JOINS, key)
            self.t.delete(JOINS, _count_field(node_id, old_gen))

    # ---- finishing nodes and runs

    async def complete(self, node: NodeDef, rec: dict[str, Any], output: Any, action: str | None,
                       route: Route, writes: Mapping[str, Any], *, fallback_of: str | None = None,
                       extra: Mapping[str, Any] | None = None) -> None:
        """A node (or the fallback standing in for it) finished: record everything, route, settle."""
        ts = self.engine.clock()
        for key, value in writes.items():
            if value is _MISSING:
                self.t.delete(STATE, key)
            else:
                self.t.put(STATE, key, value)
        self.t.put(STATE, f"_outputs.{node.id}", output)
        status = NodeStatus.COMPLETED
        if fallback_of is not None:
            self.t.put(STATE, f"_outputs.{fallback_of}", output)
            status = NodeStatus.FAILED  # the original failed; its fallback's output stands in
        new = {**rec, **(extra or {}), "status": status.value, "finished_at": ts, "action": action,
               "runs": rec.get("runs", 0) + 1}
        if fallback_of is None:
            new["error"] = None  # an earlier attempt's error is history (events), not the node's state
        new.pop("token", None)
        self.t.put(NODES, fallback_of or node.id, new)
        if fallback_of is not None:
            self.t.put(NODES, node.id, {"status": NodeStatus.COMPLETED.value, "seq": rec["seq"], "gen": 0,
                                        "attempt": rec.get("attempt", 1), "started_at": rec.get("attempt_started_at"),
                                        "finished_at": ts, "fallback_for": fallback_of,
                                        "runs": 1, "worker": rec.get("worker")})
        self.t.event({"type": "node_completed", "ts": ts, "node": fallback_of or node.id, "action": action,
                      "attempt": rec.get("attempt"), "started_at": rec.get("attempt_started_at"),
                      "worker": rec.get("worker"), **({"fallback": node.id} if fallback_of else {})})
        if route.errors:
            self.t.event({"type": "expression_error", "ts": ts, "node": node.id, "expression_errors": route.errors})
        self.add_pending(-1)
        await self._count_busy(fallback_of or node.id, -1)
        await self.arrive(fallback_of or node.id, route.decisions)
        await self.recheck_join(fallback_of or node.id)
        await self.release_held_loops(fallback_of or node.id)

    async def settle(self) -> None:
        """CONTRACT §5.8: completed when nothing is pending, queued, running, sleeping or awaiting."""
        m = await self.meta()
        if m["status"] not in (RunStatus.RUNNING, RunStatus.AWAITING):
            return
        if int(m["pending"] or 0) > 0:
            if m["status"] == RunStatus.AWAITING:
                self.set_meta("status", RunStatus.RUNNING.value)
            return
        if m["awaiting_nodes"]:
            if m["status"] != RunStatus.AWAITING:
                self.set_meta("status", RunStatus.AWAITING.value)
                self.t.event({"type": "run_awaiting", "ts": self.engine.clock(), "nodes": m["awaiting_nodes"]})
                if parent := m.get("parent"):  # a subflow that waits makes its parent node wait too
                    self.schedule(Job(parent["run_id"], parent["node_id"], parent["seq"], "child_wait",
                                      parent["attempt"]))
            return
        await self.finalize(RunStatus.COMPLETED, None)

    async def finalize(self, status: RunStatus, reason: str | None) -> None:
        """Write the run's final status, exactly once."""
        m = await self.meta()
        if m["status"] in FINAL_STATUSES:
            return
        ts = self.engine.clock()
        self.set_meta("status", status.value)
        self.set_meta("reason", reason)
        self.set_meta("finished_at", ts)
        payload = None
        if status == RunStatus.COMPLETED:
            terminals = self.bp.terminal_nodes
            got = await self.t.get_many(STATE, [f"_outputs.{n}" for n in terminals])
            payload = {"outputs": {n: got[f"_outputs.{n}"] for n in terminals if f"_outputs.{n}" in got}}
        else:
            # nodes still queued or running will never finish in this run: say so, rather than leave them "running"
            cancelled = status == RunStatus.CANCELLED
            why = "the run was cancelled" if cancelled else "the run failed"
            for node_id, rec in (await self.t.get_all(NODES)).items():
                if rec["status"] in _ACTIVE_NODE:
                    if cancelled and rec["status"] == NodeStatus.RUNNING:
                        self.t.event({"type": "attempt_cancelled", "ts": ts, "node": node_id,
                                      "attempt": rec.get("attempt"), "started_at": rec.get("attempt_started_at"),
                                      "worker": rec.get("worker"), "error": f"stopped: {why}"})
                    end = NodeStatus.CANCELLED if cancelled else NodeStatus.FAILED
                    self.t.put(NODES, node_id, {**rec, "status": end.value, "finished_at": ts,
                                                "error": rec.get("error") or f"stopped: {why} before it finished",
                                                "token": None})
        self.t.final = ({"status": status.value, "reason": reason, "payload": payload}, self.engine.settings.ttl_s)
        self.t.event({"type": "run_finished", "ts": ts, "status": status.value, "reason": reason})
        parent = m.get("parent")
        if parent:
            self.schedule(Job(parent["run_id"], parent["node_id"], parent["seq"], "child", parent["attempt"]))

    async def lose_attempt(self, node: NodeDef, rec: dict[str, Any], job: Job,
                           worker: str) -> tuple[dict[str, Any], bool]:
        """The attempt ``job`` of ``node`` was lost with ``worker`` (CONTRACT §6.1): record it, and fail the node
        when that makes ``max(2, maxRetries)`` lost attempts in a row. Returns the record with the count, and
        whether the node failed."""
        rec = {**rec, "lost_in_row": rec.get("lost_in_row", 0) + 1}
        self.t.event(_lost_event(node.id, job, rec, worker, self.engine.clock()))
        runner = node if job.kind == "exec" else self.bp.node_map[node.config.fallback or ""]
        if rec["lost_in_row"] < _lost_limit(runner):
            return rec, False
        error = f"lost {rec['lost_in_row']} attempts in a row: worker {worker} died each time"
        await self.fail_node(node, rec, job, error, False, retry=False, event=False)
        return rec, True

    async def lose_item(self, node: NodeDef, rec: dict[str, Any], st: dict[str, Any], job: Job,
                        worker: str) -> tuple[dict[str, Any], bool]:
        """``lose_attempt`` for one batch item: too many lost in a row fail the item, and so the batch node."""
        st = {**st, "lost_in_row": st.get("lost_in_row", 0) + 1}
        self.t.event(_lost_event(node.id, job, st, worker, self.engine.clock()))
        if st["lost_in_row"] < _lost_limit(node):
            return st, False
        error = f"item {job.item}: lost {st['lost_in_row']} attempts in a row (worker {worker} died each time)"
        self.t.put(BATCH, field_name(node.id, job.seq, "s", job.item),
                   {"status": "failed", "attempt": job.attempt, "error": error})
        await self.fail_node(node, rec, Job(job.run_id, node.id, job.seq, "exec", node.config.max_retries),
                             error, False, retry=False, event=False)
        return st, True

    async def fail_node(self, node: NodeDef, rec: dict[str, Any], job: Job, error: str, fatal: bool, *,
                        retry: bool = True, event: bool = True, tb: str | None = None) -> None:
        """An attempt failed: retry with backoff, else run the fallback, else fail the run. ``retry=False``:
        no further attempt (lost attempts in a row); ``event=False``: the attempt is already recorded."""
        ts = self.engine.clock()
        phase = "fallback" if job.kind == "fallback" else "exec"
        owner = node if phase == "exec" else self.bp.node_map[node.config.fallback or ""]
        cfg = owner.config
        attempt = rec.get("attempt", 1) if job.kind in ("gather", "child") else job.attempt
        if event:
            self.t.event({"type": "attempt_failed", "ts": ts, "node": node.id, "phase": phase, "attempt": attempt,
                          "started_at": rec.get("attempt_started_at"),
                          "error": error, "worker": self.engine.worker_id, **({"traceback": tb} if tb else {})})
        # this attempt ended (or ends the node), so it was not lost; whatever comes next is a fresh job
        rec = {**rec, "lost_in_row": 0, "recovery": 0, "job": None}
        if retry and not fatal and attempt < cfg.max_retries and job.kind != "item":
            delay = cfg.retry_delay_ms * (2 ** (attempt - 1))
            if event:
                self.t.events[-1]["retry_in_ms"] = delay
            self.t.put(NODES, node.id, {**rec, "status": NodeStatus.QUEUED.value, "attempt": attempt + 1,
                                        "error": error, "child": None, "items": None, "token": None,
                                        "retry_at": ts + delay})
            self.schedule(Job(self.t.run_id, node.id, rec["seq"], "exec" if phase == "exec" else "fallback",
                              attempt + 1, not_before_ms=ts + delay))
            return
        if not fatal and phase == "exec" and node.config.fallback:
            self.t.put(NODES, node.id, {**rec, "status": NodeStatus.QUEUED.value, "phase": "fallback",
                                        "attempt": 1, "exec_attempts": attempt, "error": error,
                                        "fallback": node.config.fallback,
                                        "child": None, "items": None, "token": None})
            self.schedule(Job(self.t.run_id, node.id, rec["seq"], "fallback", 1))
            return
        if phase == "fallback":
            error = f"{rec.get('error')}; fallback {node.config.fallback!r} failed: {error}"
        self.t.put(NODES, node.id, {**rec, "status": NodeStatus.FAILED.value, "error": error,
                                    "finished_at": ts, "runs": rec.get("runs", 0) + 1, "token": None})
        self.add_pending(-1)
        self.set_meta("failed_node", node.id)
        await self.finalize(RunStatus.FAILED, f"node {node.id!r} failed: {error}")


class _Step:
    """Handling of one job: claim, work, commit."""

    def __init__(self, engine: Engine, bp: Blueprint, node: NodeDef, job: Job) -> None:
        self.engine = engine
        self.bp = bp
        self.node = node
        self.job = job
        self.run_id = job.run_id
        self.token = secrets.token_hex(6)
        self.held_elsewhere = False  # set when a live step of another delivery holds the node
        self.stale = False  # set when the node no longer expects this step (duplicate or late delivery)
        self.claimed = False  # this step took the node's claim (its commit must still find its token)
        self.listed = False  # listed under this worker by its claim, and not unlisted by a commit yet
        self.failure: str | None = None  # the error, when the attempt this step ran failed

    async def txn(self, fn: Callable[[_RunTxn], Any]) -> Any:
        async def wrapped(t: Txn) -> Any:
            run = _RunTxn(self.engine, t, self.bp)
            if (await run.meta())["status"] in FINAL_STATUSES:
                return None
            result = await fn(run)
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

        async def fn(run: _RunTxn) -> None:
            run.set_meta("failed_node", self.node.id)
            await run.finalize(RunStatus.FAILED, f"node {self.node.id!r}: {error}")

        try:
            got = await self.txn(fn)
        except UndecodableValue as again:
            log.error("job %s: cannot fail run %s either (%s); dropped", self.job.job_id, self.run_id, again)
            return []
        return got[1] if got else []

    async def _release(self) -> None:
        job = self.job

        async def fn(run: _RunTxn) -> bool:
            if job.kind == "item":
                key = field_name(self.node.id, job.seq, "s", job.item)
                st = await run.t.get(BATCH, key)
                if st and st.get("token") == self.token and st["status"] == "running":
                    run.t.put(BATCH, key, {**st, "status": "queued", "token": None, "job": None})
                    self._unlist(run)
                    return True
                return False
            rec = await run.t.get(NODES, self.node.id)
            if rec and rec.get("token") == self.token and rec["status"] == NodeStatus.RUNNING \
                    and not rec.get("child") and rec.get("items") is None:
                run.t.put(NODES, self.node.id, {**rec, "status": NodeStatus.QUEUED.value, "token": None,
                                                "job": None})
                self._unlist(run)
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
        if kind in ("exec", "fallback"):
            return await self._run_exec()
        if kind == "item":
            return await self._run_item()
        if kind == "gather":
            return await self._run_gather()
        if kind == "wake":
            return await self._run_wake()
        if kind in ("child", "child_wait"):
            return await self._run_child()
        return []

    # ---- claim

    async def _claim(self) -> dict[str, Any] | None:
        job, now = self.job, self.engine.clock()

        async def fn(run: _RunTxn) -> dict[str, Any] | None:
            rec = await run.t.get(NODES, self.node.id)
            if not rec or rec["seq"] != job.seq or rec.get("phase", "exec") != job.kind \
                    or rec["attempt"] != job.attempt or rec.get("recovery", 0) != job.recovery:
                return None
            if rec["status"] == NodeStatus.RUNNING:
                if await self.engine._held(rec):
                    self.held_elsewhere = True
                    return None
                if rec.get("child") or rec.get("items") is not None:
                    # its child run / batch is already under way: take the claim over and drive it on
                    run.t.put(NODES, self.node.id, {**rec, "worker": self.engine.worker_id, "job": job.job_id})
                    self._list(run)
                    return {**rec, "_resume": True}
                if rec.get("worker") and rec["worker"] != self.engine.worker_id:
                    # arq handed on the job of a worker that died holding it: that attempt was lost
                    rec, failed = await run.lose_attempt(self.node, rec, job, rec["worker"])
                    if failed:
                        await run.settle()
                        return None
            elif rec["status"] != NodeStatus.QUEUED:
                return None
            new = {**rec, "status": NodeStatus.RUNNING.value, "token": self.token, "worker": self.engine.worker_id,
                   "job": job.job_id, "attempt_started_at": now}
            if job.attempt == 1 and job.kind == "exec":
                new["started_at"] = now
            run.t.put(NODES, self.node.id, new)
            self._list(run)
            return new

        got = await self.txn(fn)
        if got is None or got[0] is None:
            self.stale = not self.held_elsewhere and got is not None
            log.debug("job %s: not claimable (duplicate, stale, held elsewhere or run finished)", job.job_id)
            return None
        self.claimed = not got[0].get("_resume")
        if self.claimed and self.engine.on_claim is not None:
            self.engine.on_claim(self.bp.id, job)
        return got[0]

    def _list(self, run: _RunTxn) -> None:
        """List this step under its worker, in the claim's own transaction: from then on it is held while the
        worker lives, and recovered from the list when it dies (CONTRACT §6.1)."""
        run.t.listing.append((self.engine.worker_id, self.job.job_id, self.job.to_dict()))
        self.listed = True

    def _unlist(self, run: _RunTxn) -> None:
        if self.listed:
            run.t.listing.append((self.engine.worker_id, self.job.job_id, None))

    async def _commit(self, fn: Callable[[_RunTxn, dict[str, Any]], Any], *, token: str | None = None,
                      status: NodeStatus = NodeStatus.RUNNING, unlist: bool = True) -> list[tuple[str, Job]]:
        """Run ``fn`` if the node is still in the state this step left it in (same token). ``unlist=False``:
        the step goes on after this commit (a subflow starts its child run), so it stays listed."""
        expect = token or self.token

        async def wrapped(run: _RunTxn) -> bool:
            rec = await run.t.get(NODES, self.node.id)
            if not rec or rec["seq"] != self.job.seq or rec["status"] != status or rec.get("token") != expect:
                return False
            await fn(run, rec)
            await run.settle()
            if unlist:
                self._unlist(run)
            return True

        got = await self.txn(wrapped)
        if got is not None and got[0] and unlist:
            self.listed = False
        if got is None or not got[0]:
            if self.claimed:
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
        rec = await self._claim()
        if rec is None:
            return []
        node = self.node
        runner = node if self.job.kind == "exec" else self.bp.node_map[node.config.fallback or ""]
        node_input = await self.engine._node_input(self.bp, node, self.run_id)
        uses = runner.uses
        if uses == "loop-controller":
            return await self._loop(rec, node_input)
        if uses == "wait":
            return await self._wait()
        if uses == "sleep":
            return await self._sleep(rec, node_input)
        if uses == "batch":
            return await self._batch(rec, node_input)
        if uses == "subflow":
            return await self._subflow(rec, runner, node_input)
        writes: dict[str, Any] = {}
        try:
            output, action, writes = await self._call(runner, node_input, self.job.attempt)
        except NodeFailure as e:
            error, fatal, tb = str(e), e.fatal, e.traceback
            self._log_failure(error, tb)
            return await self._commit(lambda run, r: run.fail_node(node, r, self.job, error, fatal, tb=tb))
        return await self._succeed(output, action, writes, node_input, runner)

    def _log_failure(self, error: str, tb: str | None) -> None:
        """The attempt failed: note it as this step's outcome and, on workers, log it once (CONTRACT §10;
        called before the commit, so a commit retried on a WATCH conflict does not log it again).
        In-process runs show it in the result."""
        self.failure = error
        if self.engine.log_failures:
            item = f" item {self.job.item}" if self.job.item >= 0 else ""
            log.warning("run %s node %s%s attempt %d failed: %s%s", self.run_id, self.node.id, item, self.job.attempt,
                        error, f"\n{tb.rstrip()}" if tb else "",
                        extra={"run_id": self.run_id, "node_id": self.node.id, "attempt": self.job.attempt,
                               "error": error, "traceback": tb})

    async def _succeed(self, output: Any, action: str | None, writes: Mapping[str, Any], node_input: Any,
                       runner: NodeDef | None = None, token: str | None = None,
                       status: NodeStatus = NodeStatus.RUNNING) -> list[tuple[str, Job]]:
        """Route the result (reads outside the transaction), then commit it if the node is still ``status``
        with this step's token."""
        route = await self.engine._decide(self.bp, self.node, self.run_id, output, action, writes, node_input)
        fallback_of = self.node.id if runner is not None and runner.id != self.node.id else None

        async def fn(run: _RunTxn, rec: dict[str, Any]) -> None:
            await run.complete(runner or self.node, rec, output, action, route, writes, fallback_of=fallback_of)

        return await self._commit(fn, token=token, status=status)

    async def _call(self, runner: NodeDef, node_input: Any, attempt: int, *, uses: str | None = None,
                    extra: dict[str, Any] | None = None) -> tuple[Any, str | None, dict[str, Any]]:
        """Call the user's function once, with the attempt's timeout. Raises NodeFailure."""
        name = uses or runner.uses
        fn = self.engine.registry.get(name)
        if fn is None:
            raise NodeFailure(f"node type {name!r} is not registered on worker {self.engine.worker_id}", fatal=True)
        engine, run_id = self.engine, self.run_id
        store_errors: list[BaseException] = []

        # A store error inside ctx.context is the worker's trouble, not the node's: remember it, so the
        # attempt is handed back below even when the node's code caught it or raised something else
        async def read_one(key: str) -> Any:
            try:
                value = await engine._read_context(run_id, key)
            except Exception as e:
                store_errors.append(e)
                raise
            return _MISSING if value is MISSING else value

        async def read_all() -> dict[str, Any]:
            try:
                return await engine.store.read_all(run_id, STATE)
            except Exception as e:
                store_errors.append(e)
                raise

        view = RunContext(read_one, read_all)
        item = (extra or {}).get("item_index", -1)
        ctx = NodeContext(run_id=run_id, node_id=runner.id, blueprint_id=self.bp.id, attempt=attempt,
                          input=node_input, params=runner.params, context=view, extra=extra or {},
                          idempotency_key=idempotency_key(run_id, runner.id, self.job.seq, item))
        # the attempt's own limit and nothing shorter (CONTRACT §6.1): the node's timeout, else the default
        timeout = runner.config.timeout_ms / 1000 if runner.config.timeout_ms else self.engine.settings.attempt_timeout_s
        try:
            if _is_async(fn):
                result = await asyncio.wait_for(fn(ctx), timeout)
            else:
                loop = asyncio.get_running_loop()
                ctx.context = SyncRunContext(view, loop)
                result = await asyncio.wait_for(asyncio.to_thread(fn, ctx), timeout)
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, timeout)
        except TimeoutError:
            raise NodeTimeout(f"attempt {attempt} timed out after {int((timeout or 0) * 1000)} ms") from None
        except NodeFailure:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the user's code failed: that is the attempt's error
            if store_errors:
                raise store_errors[0] from e  # the store failed under the node: hand the step back
            raise NodeFailure(f"{type(e).__name__}: {e}", traceback=user_traceback(e)) from e
        if isinstance(result, NodeResult):
            output, action = result.output, result.action
        else:
            output, action = result, None
        if action is not None and not isinstance(action, str):
            raise NodeFailure(f"node {runner.id!r} returned an action of type {json_type(action)}, not a string",
                              fatal=True)
        bad = _json_problem(output)
        if bad:
            raise NodeFailure(f"node {runner.id!r} returned an output that is not JSON-serializable "
                              f"(a {bad})", fatal=True)
        for key, value in view.writes.items():
            if value is not _MISSING and (bad := _json_problem(value)):
                raise NodeFailure(f"node {runner.id!r} set context key {key!r} to a value that is not "
                                  f"JSON-serializable (a {bad})", fatal=True)
        return output, action, dict(view.writes)

    # ---- built-ins

    async def _loop(self, rec: dict[str, Any], node_input: Any) -> list[tuple[str, Job]]:
        """loop-controller: ``continue`` (a new iteration of the body) while ``params.condition`` holds and
        fewer than ``params.maxIterations`` iterations ran; else ``break``. An exit edge whose own
        condition holds breaks the loop first."""
        node = self.node
        edges = self.bp.out_edges[node.id]
        cont = [e for e in edges if e.action == CONTINUE]
        exits = [e for e in edges if e.action != CONTINUE]
        cond = loop_condition(node)
        names = set(cond.names if cond else ())
        for e in edges:
            for expr in (e.condition, e.transform):
                if expr is not None:
                    names |= set(expr.names)
        base = {"result": {"output": None, "action": None}, "input": node_input}
        scope = await self.engine._scope(self.run_id, names, base, {})
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
        route = _aggregate(considered, chosen, scope, None, events, node.id, self.run_id)
        if action == CONTINUE:
            route.decisions = [d for d in route.decisions if d.taken]  # a continue skips nothing

        async def fn(run: _RunTxn, r: dict[str, Any]) -> None:
            if action == CONTINUE:
                await run.reset_loop_body(node.id)
            elif capped:
                run.t.event({"type": "loop_max_iterations", "ts": self.engine.clock(), "node": node.id,
                             "iterations": iteration})
            extra = {"iter": iteration + 1 if action == CONTINUE else iteration}
            await run.complete(node, {**r, **extra}, None, action, route, {})

        return await self._commit(fn)

    async def _wait(self) -> list[tuple[str, Job]]:
        async def fn(run: _RunTxn, rec: dict[str, Any]) -> None:
            m = await run.meta()
            run.t.put(NODES, self.node.id, {**rec, "status": NodeStatus.AWAITING.value, "token": self.token})
            run.set_meta("awaiting_nodes", [*(m["awaiting_nodes"] or []), self.node.id])
            run.add_pending(-1)
            run.t.event({"type": "node_awaiting", "ts": self.engine.clock(), "node": self.node.id})

        return await self._commit(fn)

    async def _sleep(self, rec: dict[str, Any], node_input: Any) -> list[tuple[str, Job]]:
        try:
            duration = parse_duration_ms(self.node.params.get("duration"))
        except ValueError as e:
            error = str(e)
            return await self._commit(lambda run, r: run.fail_node(self.node, r, self.job, error, True))
        wake_at = self.engine.clock() + duration

        async def fn(run: _RunTxn, r: dict[str, Any]) -> None:
            run.t.put(NODES, self.node.id, {**r, "status": NodeStatus.SLEEPING.value, "wake_at": wake_at})
            keep_until = max(wake_at, (await run.meta()).get("keep_until") or 0)
            run.set_meta("keep_until", keep_until)
            run._extend_expiry(keep_until)
            run.schedule(Job(self.run_id, self.node.id, self.job.seq, "wake", 1, not_before_ms=wake_at))

        return await self._commit(fn)

    async def _run_wake(self) -> list[tuple[str, Job]]:
        rec = await self.engine.store.read(self.run_id, NODES, [self.node.id])
        r = rec[0]
        if r is MISSING or r["seq"] != self.job.seq or r["status"] != NodeStatus.SLEEPING:
            self.stale = True
            return []
        node_input = await self.engine._node_input(self.bp, self.node, self.run_id)
        return await self._succeed(node_input, None, {}, node_input, token=r.get("token"), status=NodeStatus.SLEEPING)

    async def _batch(self, rec: dict[str, Any], node_input: Any) -> list[tuple[str, Job]]:
        """batch: one job per item of the input list (``params.worker`` runs each); the output is the list
        of results in item order."""
        if rec.get("_resume"):
            self.stale = True
            return []  # already expanded; its items are under way
        if node_input is None:
            node_input = []
        if not isinstance(node_input, list):
            msg = f"batch input must be a list, got {json_type(node_input)}"
            return await self._commit(lambda run, r: run.fail_node(self.node, r, self.job, msg, False))
        if not node_input:
            return await self._succeed([], None, {}, node_input)
        seq = self.job.seq

        async def fn(run: _RunTxn, r: dict[str, Any]) -> None:
            run.t.put(NODES, self.node.id, {**r, "items": len(node_input)})
            run.t.put(BATCH, field_name(self.node.id, seq, "n"), len(node_input))
            run.t.put(BATCH, field_name(self.node.id, seq, "done"), 0)
            for i, item in enumerate(node_input):
                run.t.put(BATCH, field_name(self.node.id, seq, "i", i), item)
                run.t.put(BATCH, field_name(self.node.id, seq, "s", i), {"status": "queued", "attempt": 1})
                run.schedule(Job(self.run_id, self.node.id, seq, "item", 1, item=i))

        return await self._commit(fn)

    async def _run_item(self) -> list[tuple[str, Job]]:
        job, node = self.job, self.node
        skey = field_name(node.id, job.seq, "s", job.item)
        now = self.engine.clock()

        async def claim(run: _RunTxn) -> tuple[Any, str] | None:
            rec = await run.t.get(NODES, node.id)
            if not rec or rec["seq"] != job.seq or rec["status"] != NodeStatus.RUNNING or rec.get("phase") != "exec":
                return None
            st = await run.t.get(BATCH, skey)
            if not st or st["attempt"] != job.attempt or st.get("recovery", 0) != job.recovery:
                return None
            if st["status"] == "running" and await self.engine._held(st):
                self.held_elsewhere = True
                return None
            if st["status"] not in ("queued", "running"):
                return None
            if st["status"] == "running" and st.get("worker") and st["worker"] != self.engine.worker_id:
                # arq handed on the job of a worker that died holding this item: that attempt was lost
                st, failed = await run.lose_item(node, rec, st, job, st["worker"])
                if failed:
                    await run.settle()
                    return None
            run.t.put(BATCH, skey, {**st, "status": "running", "token": self.token, "worker": self.engine.worker_id,
                                    "job": job.job_id, "attempt_started_at": now})
            self._list(run)
            return await run.t.get(BATCH, field_name(node.id, job.seq, "i", job.item)), rec["token"]

        got = await self.txn(claim)
        if got is None or got[0] is None:
            self.stale = not self.held_elsewhere
            return []
        self.claimed = True
        item, node_token = got[0]
        worker = str(node.params.get("worker"))
        try:
            output, _action, writes = await self._call(node, item, job.attempt, uses=worker,
                                                       extra={"item_index": job.item})
        except NodeFailure as e:
            error, fatal, tb = str(e), e.fatal, e.traceback
            self._log_failure(error, tb)

            async def failed(run: _RunTxn) -> bool:
                rec = await run.t.get(NODES, node.id)
                st = await run.t.get(BATCH, skey)
                if not rec or rec.get("token") != node_token or not st or st.get("token") != self.token:
                    return False
                self._unlist(run)
                if not fatal and job.attempt < node.config.max_retries:
                    delay = node.config.retry_delay_ms * (2 ** (job.attempt - 1))
                    run.t.put(BATCH, skey, {"status": "queued", "attempt": job.attempt + 1, "error": error})
                    run.t.event({"type": "attempt_failed", "ts": now, "node": node.id, "item": job.item,
                                 "attempt": job.attempt, "error": error, "worker": self.engine.worker_id,
                                 "started_at": st.get("attempt_started_at"), **({"traceback": tb} if tb else {})})
                    run.schedule(Job(self.run_id, node.id, job.seq, "item", job.attempt + 1, item=job.item,
                                     not_before_ms=self.engine.clock() + delay))
                else:
                    run.t.put(BATCH, skey, {"status": "failed", "attempt": job.attempt, "error": error})
                    await run.fail_node(node, rec, Job(self.run_id, node.id, job.seq, "exec", node.config.max_retries),
                                        f"item {job.item}: {error}", False, tb=tb)
                await run.settle()
                return True

            res = await self.txn(failed)
            if res and res[0]:
                self.listed = False
            return res[1] if res and res[0] else []

        async def done(run: _RunTxn) -> bool:
            rec = await run.t.get(NODES, node.id)
            st = await run.t.get(BATCH, skey)
            if not rec or rec.get("token") != node_token or not st or st.get("token") != self.token:
                return False
            self._unlist(run)
            for key, value in writes.items():
                if value is _MISSING:
                    run.t.delete(STATE, key)
                else:
                    run.t.put(STATE, key, value)
            run.t.put(BATCH, skey, {"status": "done", "attempt": job.attempt})
            run.t.put(BATCH, field_name(node.id, job.seq, "r", job.item), output)
            n_done = await run.t.get(BATCH, field_name(node.id, job.seq, "done"), 0) + 1
            run.t.put(BATCH, field_name(node.id, job.seq, "done"), n_done)
            if n_done >= await run.t.get(BATCH, field_name(node.id, job.seq, "n"), 0):
                run.schedule(Job(self.run_id, node.id, job.seq, "gather", 1))
            return True

        res = await self.txn(done)
        if res and res[0]:
            self.listed = False
        return res[1] if res and res[0] else []

    async def _run_gather(self) -> list[tuple[str, Job]]:
        node, seq = self.node, self.job.seq
        recs = await self.engine.store.read(self.run_id, NODES, [node.id])
        rec = recs[0]
        if rec is MISSING or rec["seq"] != self.job.seq or rec["status"] != NodeStatus.RUNNING:
            self.stale = True
            return []
        n = (await self.engine.store.read(self.run_id, BATCH, [field_name(node.id, seq, "n")]))[0]
        results = await self.engine.store.read(self.run_id, BATCH, [field_name(node.id, seq, "r", i) for i in range(n)])
        if any(r is MISSING for r in results):
            self.stale = True
            return []
        node_input = await self.engine._node_input(self.bp, node, self.run_id)
        return await self._succeed(list(results), None, {}, node_input, token=rec.get("token"))

    async def _subflow(self, rec: dict[str, Any], runner: NodeDef, node_input: Any) -> list[tuple[str, Job]]:
        """subflow: a child run linked to this node; the child's end schedules a ``child`` job here."""
        params = runner.params
        child_bp = str(params.get("blueprintId"))
        child_id = child_run_id(self.run_id, self.node.id, self.job.seq, self.job.attempt)
        mapping = params.get("inputs")
        seed: dict[str, Any] | None = None
        if isinstance(mapping, Mapping):
            seed = {}
            for child_key, parent_key in mapping.items():
                ctx_v, out_v = await self.engine.store.read(self.run_id, STATE, [str(parent_key), f"_outputs.{parent_key}"])
                seed[child_key] = ctx_v if ctx_v is not MISSING else (None if out_v is MISSING else out_v)
        child_input = seed if seed is not None else node_input
        scheduled: list[tuple[str, Job]] = []
        if not rec.get("_resume"):
            async def fn(run: _RunTxn, r: dict[str, Any]) -> None:
                run.t.put(NODES, self.node.id, {**r, "child": child_id})
            scheduled = await self._commit(fn, unlist=False)  # listed until the child run exists
            if self.stale:  # the node moved on (duplicate delivery, or the run finished): start no child
                return []
        parent = {"run_id": self.run_id, "node_id": self.node.id, "seq": self.job.seq, "attempt": self.job.attempt}
        try:
            _, jobs = await self.engine.start_run(child_bp, child_input, run_id=child_id, parent=parent, seed=seed)
            if not jobs and rec.get("_resume"):
                # driven on after a crash: the child may exist with its start jobs still in its outbox
                jobs = [(child_id, Job.from_dict(d)) for d in (await self.engine.store.read_all(child_id, OUTBOX)).values()]
        except InvalidInput as e:
            error = str(e)
            token = rec.get("token") if rec.get("_resume") else None
            return scheduled + await self._commit(
                lambda run, r: run.fail_node(self.node, r, self.job, error, True), token=token)
        return scheduled + jobs

    async def _child_awaits(self, rec: dict[str, Any], child_id: str) -> list[tuple[str, Job]]:
        """The child run rests awaiting: this node awaits too, so the parent run can rest; a resume of this
        node is passed on to the child."""
        async def fn(run: _RunTxn, r: dict[str, Any]) -> None:
            m = await run.meta()
            run.t.put(NODES, self.node.id, {**r, "status": NodeStatus.AWAITING.value})
            run.set_meta("awaiting_nodes", [*(m["awaiting_nodes"] or []), self.node.id])
            run.add_pending(-1)
            run.t.event({"type": "node_awaiting", "ts": self.engine.clock(), "node": self.node.id,
                         "child": child_id})

        scheduled = await self._commit(fn, token=rec.get("token"))
        if await self.engine.store.read_status(child_id) is not None:
            # the child ended meanwhile (resumed directly): wake this node and finish it now
            return scheduled + await self._run_child()
        return scheduled

    async def _run_child(self) -> list[tuple[str, Job]]:
        r = (await self.engine.store.read(self.run_id, NODES, [self.node.id]))[0]
        if r is MISSING or r["seq"] != self.job.seq or not r.get("child") or \
                r["status"] not in (NodeStatus.RUNNING, NodeStatus.AWAITING):
            self.stale = True
            return []
        child_id = r["child"]
        status = await self.engine.store.read_status(child_id)
        if status is None:
            child_meta = await self.engine._find_meta(child_id)
            if child_meta and child_meta["status"] == RunStatus.AWAITING and r["status"] == NodeStatus.RUNNING:
                return await self._child_awaits(r, child_id)
            return []
        if r["status"] == NodeStatus.AWAITING:
            # the child was resumed directly and has ended: this node is busy again until it settles below
            async def wake(run: _RunTxn, rr: dict[str, Any]) -> None:
                m = await run.meta()
                run.t.put(NODES, self.node.id, {**rr, "status": NodeStatus.RUNNING.value})
                run.set_meta("awaiting_nodes", [n for n in m["awaiting_nodes"] or [] if n != self.node.id])
                run.add_pending(1)

            await self._commit(wake, token=r.get("token"), status=NodeStatus.AWAITING)
            r = {**r, "status": NodeStatus.RUNNING.value}
        runner = self.node if r.get("phase", "exec") == "exec" else self.bp.node_map[self.node.config.fallback or ""]
        job = Job(self.run_id, self.node.id, self.job.seq, r.get("phase", "exec"), r["attempt"])
        if status["status"] != RunStatus.COMPLETED:
            msg = f"subflow {runner.params.get('blueprintId')!r} (run {child_id}) {status['status']}: {status.get('reason')}"
            return await self._commit(lambda run, rr: run.fail_node(self.node, rr, job, msg, False), token=r.get("token"))
        child_ctx = await self.engine.store.read_all(child_id, STATE)
        outputs = runner.params.get("outputs")
        writes: dict[str, Any] = {}
        if isinstance(outputs, Mapping):
            for parent_key, child_node in outputs.items():
                v = child_ctx.get(f"_outputs.{child_node}", child_ctx.get(str(child_node)))
                writes[str(parent_key)] = v
            output: Any = child_ctx
        else:
            child_bp = self.engine.blueprints[str(runner.params.get("blueprintId"))]
            done = {t: child_ctx[f"_outputs.{t}"] for t in child_bp.terminal_nodes if f"_outputs.{t}" in child_ctx}
            output = next(iter(done.values())) if len(done) == 1 else done
        node_input = await self.engine._node_input(self.bp, self.node, self.run_id)
        if runner is not self.node:
            return await self._succeed(output, None, writes, node_input, runner, token=r.get("token"))
        return await self._succeed(output, None, writes, node_input, token=r.get("token"))


TRACEBACK_CAP = 8 * 1024
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


def user_traceback(e: BaseException) -> str:
    """The traceback of a node's exception, its own frames only (not flowcraft's, not asyncio's), at most 8 KB:
    the end is kept, since the frames nearest the raise say the most."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(_OWN_DIR) and "/asyncio/" not in f.filename
              and "/concurrent/futures/" not in f.filename]
    text = "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)) + \
        "".join(traceback.format_exception_only(type(e), e))
    if len(text.encode()) > TRACEBACK_CAP:
        text = "…\n" + text.encode()[-(TRACEBACK_CAP - 4):].decode(errors="ignore")
    return text


def _lost_event(node_id: str, job: Job, holder: Mapping[str, Any], worker: str, ts: int) -> dict[str, Any]:
    return {"type": "attempt_lost", "ts": ts, "node": node_id, "attempt": job.attempt,
            "started_at": holder.get("attempt_started_at"), "worker": worker,
            "error": f"worker {worker} stopped heartbeating", **({"item": job.item} if job.item >= 0 else {})}


def _lost_limit(node: NodeDef) -> int:
    """Lost attempts in a row that fail a node (CONTRACT §6.1: ``maxRetries``). At least two, so that one
    crash never fails a node, even one with a single attempt (§6: a SIGKILLed worker loses nothing), while a
    node that kills its worker every time still ends."""
    return max(2, node.config.max_retries)


def idempotency_key(run_id: str, node_id: str, seq: int, item: int = -1) -> str:
    """CONTRACT §4: the same for every attempt and redelivery of one node execution (run, node, firing —
    a loop iteration fires a node again with a new seq —, batch item) and different for any other. A hash,
    so any node id gives a fixed-length key that payment APIs and database constraints accept."""
    raw = dumps([run_id, node_id, seq, item])
    return "fc_" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def _is_async(fn: Any) -> bool:
    # an object with an async __call__ counts too
    call = type(fn).__dict__.get("__call__") if not inspect.isfunction(fn) else None
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
