"""A run's lifecycle inside one transaction (``RunTxn``): fire a node, deliver its decisions to the joins
and loops of its successors (deciding with ``joins`` and ``loops``), complete or fail it, settle and
finalize the run. Every read and write goes through the transaction's ``Txn``, as typed records."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..blueprint import BUILTINS, Blueprint, JoinStrategy, NodeDef
from ..ids import claim_token
from ..jobs import Job
from ..node_api import _MISSING
from ..store import JOINS, OUTBOX, RUN, STATE, Txn
from . import joins, loops
from .reads import input_fields, node_input_from, tracks_arrivals, warm_run
from .routing import Decision, Route
from .state import (
    ACTIVE_NODE,
    FINAL_STATUSES,
    REF,
    Arrival,
    BatchItem,
    Held,
    InlineStep,
    ItemStatus,
    JobKind,
    NodeRecord,
    NodeStatus,
    RunMeta,
    RunStatus,
    arrival_field,
    count_field,
    evolve,
    read_arrival,
    read_arrivals,
    read_count,
    read_meta,
    read_node,
    read_nodes,
    write_arrival,
    write_count,
    write_item,
    write_node,
)

if TYPE_CHECKING:
    from .engine import Engine


class RunTxn:
    """Engine operations inside one transaction of one run."""

    def __init__(self, engine: Engine, t: Txn, bp: Blueprint) -> None:
        self.engine = engine
        self.t = t
        self.bp = bp
        t.blueprint_id = bp.id
        self.scheduled: list[tuple[str, Job]] = []
        self._meta: RunMeta | None = None
        # a step's commit may claim one successor it makes ready for its own worker (``fire``): listed as
        # ``inline_as``, the queue job the step runs under
        self.inline_as: str | None = None
        self.inline: list[InlineStep] = []
        # node id -> (token, started_at) of a successor whose node already ran (or runs) ahead of this commit
        self.claim_as: dict[str, tuple[str, int]] = {}

    async def meta(self) -> RunMeta:
        if self._meta is None:
            self._meta = await read_meta(self.t)
            self.extend_expiry(self._meta.keep_until)
            self.t.ancestors = list(self._meta.ancestors)  # they live as long as this run
        return self._meta

    def extend_expiry(self, keep_until: int | None) -> None:
        """An unfinished run's keys live ``running_ttl_s`` past its last step, and past any wake-up it still
        waits for (a sleep longer than that must not find its run expired)."""
        if keep_until:
            running = self.engine.settings.running_ttl_s
            extra_s = max(0, (keep_until - self.engine.clock()) // 1000 + 1)
            self.t.ttl_s = running + extra_s if running > 0 else 0

    def set_meta(self, **changes: Any) -> None:
        """Change meta fields (``RunMeta`` attributes); only those fields are written. In place: whoever holds
        the meta this transaction read sees the change (``undo`` in ``Engine._resume_child`` reads ``pending``
        after moving it)."""
        assert self._meta is not None
        for name, value in changes.items():
            setattr(self._meta, name, value)  # a slots dataclass: an unknown name raises AttributeError
            self.t.put(RUN, name, self._meta.field_json(name))

    def add_pending(self, delta: int) -> None:
        meta = self._meta
        assert meta is not None
        meta.pending += delta  # (set_meta, by hand: twice a node)
        self.t.put(RUN, "pending", meta.pending)

    def schedule(self, job: Job) -> None:
        """Write the job to the outbox of the run whose transaction this is; the driver queues it after
        the commit and then deletes the outbox entry (a crash in between leaves it for the reconciler)."""
        self.t.put(OUTBOX, job.job_id, job.to_dict())
        self.t.jobs[job.job_id] = job  # a store that queues it in the commit needs not decode it again
        self.scheduled.append((self.t.run_id, job))
        if self.engine.take_queued and job.kind == JobKind.EXEC and not job.not_before_ms:
            self.engine.note_queued(self.t.run_id, job.node_id)  # a later commit here may run it instead

    async def steal_queued(self, want: int = 1) -> bool:
        """Claim, for this worker, a node of this run whose job waits in the queue (one this process queued; up to
        ``want`` of them: ``Engine.sibling_claims``), to run it next instead of picking a job: a fan-out's branches
        then run one after another on each busy worker slot, with one commit each and no queue round trips. Its
        queue job is dropped in the same commit (``Txn.unqueue``; a worker that took it already then finds the step
        held). The newest first: workers picking from the queue take the oldest, so the two rarely reach for the
        same job."""
        hints = self.engine.queued_hints(self.t.run_id)
        if self.t.steal_refusals >= 2:
            # the siblings it tried were taken by another worker (held, or done): so are the rest, likely
            self.engine.forget_queued(self.t.run_id)
            return False
        while hints:
            node_id = hints.pop()
            node = self.bp.node_map.get(node_id)
            if node is None or node.uses in BUILTINS:
                continue
            if self.inline and node.inputs is not None:
                # its input is read from the context as it is claimed: claimed with others, it would be read
                # before they ran and wrote what it reads. It waits for a claim of its own
                hints.append(node_id)
                break
            rec = await read_node(self.t, node_id)
            if rec is None or rec.status != NodeStatus.QUEUED or rec.current_phase != JobKind.EXEC:
                continue
            if rec.retry_at is not None and rec.retry_at > self.engine.clock():
                continue  # a failed attempt's retry, which waits out its delay in the queue
            job = Job(self.t.run_id, node_id, rec.seq, JobKind.EXEC.value, rec.attempt or 1, recovery=rec.recovery or 0)
            await self._claim_inline(job, rec)
            self.t.unqueue.append(job.job_id)
            self.t.unheld.append(job.job_id)  # a worker that took it may be running it unclaimed
            if len(self.inline) >= want:
                break
        return bool(self.inline)

    # ---- firing, skipping, joins

    async def fire(self, node_id: str, value: Any, *, loop_entry: bool = False) -> None:
        """Make a node ready: write its input, queue its first attempt."""
        await self.meta()
        rec = await read_node(self.t, node_id)
        ahead = self.claim_as.get(node_id)  # (run ahead: it was ready when its node started)
        new = loops.fired(rec, is_controller=self.bp.is_loop_controller(node_id), loop_entry=loop_entry,
                          now_ms=self.engine.clock() if ahead is None else ahead[1])
        write_node(self.t, node_id, new)
        self.t.put(STATE, f"_inputs.{node_id}", value)
        self.add_pending(1)
        await self.count_busy(node_id, +1)
        job = Job(self.t.run_id, node_id, new.seq)
        if self.inline_as is not None and not self.inline and self.bp.node_map[node_id].uses not in BUILTINS \
                and (self.engine.inline_steps or ahead is not None):
            await self._claim_inline(job, new)
        else:
            self.schedule(job)
        warm_run(self.t, self.bp)  # its step reads its successors' records and joins (reads.prefetch_commit)

    async def _claim_inline(self, job: Job, rec: NodeRecord) -> None:
        """Claim a node just fired (or queued: ``steal_queued``) for the worker committing this step, which runs
        it next (``InlineStep``): the claim a queued job's step would take, written in this commit instead."""
        assert self.inline_as is not None
        node = self.bp.node_map[job.node_id]
        token, now = self.claim_as.get(job.node_id) or (claim_token(), self.engine.clock())
        claimed = evolve(rec, status=NodeStatus.RUNNING, token=token, worker=self.engine.worker_id,
                          job=self.inline_as, attempt_started_at=now)
        if job.attempt == 1:  # (a retry, claimed by a sibling's commit, keeps the node's first start, as Step.claim)
            claimed.started_at = now
        write_node(self.t, job.node_id, claimed)
        # it takes over the committing step's entry as it is, which names the job the chain started from (no
        # rewrite a step: recovery finds the step running under it by its claim, ``engine._listed_step``)
        node_input = node_input_from(node, await self.t.get_many(STATE, input_fields(node)))
        self.inline.append(InlineStep(job, token, claimed, node_input, self.inline_as))

    async def count_busy(self, node_id: str, delta: int) -> None:
        """Each loop-controller counts the body nodes fired and not yet finished, so telling whether its body
        is idle costs one read, not a read of the whole body."""
        for controller in self.bp.loops_containing.get(node_id, ()):
            write_node(self.t, controller, loops.with_busy(await read_node(self.t, controller), delta))

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
                rec = await read_node(self.t, d.target)
                await self._arrive_loop(src, d, node, rec, rec.gen if rec else 0, work)
                continue
            src, d = work.popleft()
            tgt = d.target
            node = self.bp.node_map[tgt]
            if node.uses == "loop-controller" and src not in self.bp.loop_entry_sources[tgt]:
                loop_backs.append((src, d))
                continue
            rec = await read_node(self.t, tgt)
            gen = rec.gen if rec else 0
            if node.uses == "loop-controller":
                await self._arrive_loop(src, d, node, rec, gen, work)
                continue
            if joins.decided_in(rec, gen):
                continue  # already fired or skipped in this generation: a duplicate or late arrival
            if tracks_arrivals(self.bp, tgt):
                counts = await self._record_arrival(tgt, gen, src, d)
                if counts is None:
                    continue
            else:
                counts = joins.count_arrival(None, d.taken)  # its one arrival decides it now
            if joins.is_busy(rec):
                continue  # still busy with the previous loop iteration: its completion looks at this join
            await self._decide_join(tgt, node, rec, gen, counts, (src, d) if d.taken else None, work)

    async def _decide_join(self, tgt: str, node: NodeDef, rec: NodeRecord | None, gen: int,
                           counts: tuple[int, int], trigger: tuple[str, Decision] | None,
                           work: deque[tuple[str, Decision]]) -> None:
        """Fire, skip (and the skip travels on) or wait, as ``joins.decide_join`` says. An ``any`` join fires
        with the value of the arrival that triggered it; an ``all`` join with ``joins.join_input``."""
        preds = self.bp.predecessors[tgt]
        verdict = joins.decide_join(node.config.join_strategy, len(preds), counts)
        if verdict == joins.JoinVerdict.SKIP:
            self._skip(tgt, rec, gen, work)
        elif verdict == joins.JoinVerdict.FIRE and node.config.join_strategy == JoinStrategy.ANY:
            if trigger is None:  # re-checked after a busy node finished: any taken arrival will do
                arrivals = await read_arrivals(self.t, tgt, gen, preds)
                src = joins.first_taken(preds, arrivals)
                trigger = (src, Decision(tgt, True, arrivals[src].value))
            await self.fire(tgt, await self._value_of(*trigger))
        elif verdict == joins.JoinVerdict.FIRE and len(preds) == 1 and trigger is not None:
            await self.fire(tgt, await self._value_of(*trigger))  # joins.join_input of its one arrival
        elif verdict == joins.JoinVerdict.FIRE:
            await self.fire(tgt, await self._join_input(tgt, gen))

    async def recheck_join(self, node_id: str) -> None:
        """A node that finished after a loop ``continue`` moved it to a new generation: the arrivals of
        that generation may already decide it."""
        rec = await read_node(self.t, node_id)
        if rec is None or not joins.needs_recheck(rec):
            return
        counts = await read_count(self.t, node_id, rec.gen)
        if counts:
            work: deque[tuple[str, Decision]] = deque()
            await self._decide_join(node_id, self.bp.node_map[node_id], rec, rec.gen, counts, None, work)
            await self._drain(work)

    async def _record_arrival(self, tgt: str, gen: int, src: str, d: Decision) -> tuple[int, int] | None:
        if await read_arrival(self.t, tgt, gen, src) is not None:
            return None  # this predecessor already arrived in this generation
        write_arrival(self.t, tgt, gen, src, Arrival(d.taken, d.value))
        counts = joins.count_arrival(await read_count(self.t, tgt, gen), d.taken)
        write_count(self.t, tgt, gen, counts)
        return counts

    async def _arrive_loop(self, src: str, d: Decision, node: NodeDef, rec: NodeRecord | None, gen: int,
                           work: deque[tuple[str, Decision]]) -> None:
        """A loop-controller runs on every taken arrival (entry or loop-back). It is skipped only when all
        its entry edges were not taken; a loop-back that is not taken changes nothing."""
        entry = src in self.bp.loop_entry_sources[node.id]
        status = rec.status if rec else NodeStatus.PENDING
        if d.taken:
            if status in (NodeStatus.QUEUED, NodeStatus.RUNNING):
                self.t.event({"type": "loop_arrival_ignored", "ts": self.engine.clock(), "node": node.id,
                              "source": src, "why": "the controller is already running"})
                return
            if not entry and await self._body_busy(node.id):
                # iterations do not overlap: the next one starts when every node of this one rests
                write_node(self.t, node.id, evolve(rec or NodeRecord(seq=0, runs=0), held=Held(src, d.value)))
                return
            if entry:
                await self._record_arrival(node.id, gen, src, d)
            await self.fire(node.id, await self._value_of(src, d), loop_entry=entry)
        elif entry and status == NodeStatus.PENDING:
            counts = await self._record_arrival(node.id, gen, src, d)
            if counts and counts[0] >= len(self.bp.loop_entry_sources[node.id]) and counts[1] == 0:
                self._skip(node.id, rec, gen, work)

    async def _body_busy(self, controller: str) -> bool:
        rec = await read_node(self.t, controller)
        if rec is not None and (rec.busy or 0) > 0:
            return True  # (read no further)
        inner = await read_nodes(self.t, self.bp.inner_loops[controller])
        return loops.body_busy(rec, inner.values())

    async def release_held_loops(self, node_id: str) -> None:
        """A loop-back arrival waits while its body is busy; the last body node to finish lets it in."""
        for controller in self.bp.loops_containing.get(node_id, ()):
            rec = await read_node(self.t, controller)
            if rec is None or rec.held is None or rec.status in ACTIVE_NODE or await self._body_busy(controller):
                continue
            held = rec.held
            write_node(self.t, controller, evolve(rec, held=None))
            value = held.value if held.value is not REF else await self.t.get(STATE, f"_outputs.{held.source}")
            await self.fire(controller, value)

    def _skip(self, node_id: str, rec: NodeRecord | None, gen: int, work: deque[tuple[str, Decision]]) -> None:
        write_node(self.t, node_id, joins.skipped(rec, gen))
        for tgt in dict.fromkeys(e.target for e in self.bp.out_edges[node_id]):
            work.append((node_id, Decision(tgt, False)))

    async def _value_of(self, src: str, d: Decision) -> Any:
        if d.value is not REF:
            return d.value
        return await self.t.get(STATE, f"_outputs.{src}")

    async def _join_input(self, tgt: str, gen: int) -> Any:
        preds = self.bp.predecessors[tgt]
        arrivals = await read_arrivals(self.t, tgt, gen, preds)
        refs = await self.t.get_many(STATE, [f"_outputs.{p}" for p in joins.taken_sources(preds, arrivals)
                                             if arrivals[p].value is REF])
        outputs = {k[len("_outputs."):]: v for k, v in refs.items()}
        return joins.join_input(preds, arrivals, outputs)

    async def reset_loop_body(self, controller: str) -> None:
        """``continue``: every node of the body starts a new generation. Arrivals from outside the body
        carry over (they happened once, before the loop); nodes still active are left alone."""
        body = self.bp.loop_bodies[controller]
        recs = await read_nodes(self.t, body)
        for node_id in body:
            rec = recs.get(node_id)
            new = loops.next_generation(rec)
            if new is None:
                continue
            old_gen, new_gen = new.gen - 1, new.gen
            write_node(self.t, node_id, new)
            preds = self.bp.predecessors[node_id]
            outside = [p for p in preds if p not in body and p != controller]
            old = await read_arrivals(self.t, node_id, old_gen, preds)
            kept, counts = loops.carried_arrivals(outside, old)
            for p, a in kept.items():
                write_arrival(self.t, node_id, new_gen, p, a)
            if counts[0]:
                write_count(self.t, node_id, new_gen, counts)
            for p in old:
                self.t.delete(JOINS, arrival_field(node_id, old_gen, p))
            self.t.delete(JOINS, count_field(node_id, old_gen))

    # ---- finishing nodes and runs

    async def complete(self, node: NodeDef, rec: NodeRecord, output: Any, action: str | None,
                       route: Route, writes: Mapping[str, Any], *, fallback_of: str | None = None,
                       at: int | None = None) -> None:
        """A node (or the fallback standing in for it) finished (``at``, else now): record everything, route,
        settle."""
        ts = self.engine.clock() if at is None else at
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
        # an earlier attempt's error is history (events), not the node's state; a fallback keeps the error
        new = evolve(rec, status=status, finished_at=ts, action=action, runs=rec.runs + 1, token=None,
                      error=rec.error if fallback_of is not None else None)
        write_node(self.t, fallback_of or node.id, new)
        if fallback_of is not None:
            write_node(self.t, node.id, NodeRecord(
                status=NodeStatus.COMPLETED, seq=rec.seq, gen=0, attempt=rec.attempt or 1,
                started_at=rec.attempt_started_at, finished_at=ts, fallback_for=fallback_of, runs=1,
                worker=rec.worker))
        self.t.event({"type": "node_completed", "ts": ts, "node": fallback_of or node.id, "action": action,
                      "attempt": rec.attempt, "started_at": rec.attempt_started_at,
                      "worker": rec.worker, **({"fallback": node.id} if fallback_of else {})})
        if route.errors:
            self.t.event({"type": "expression_error", "ts": ts, "node": node.id, "expression_errors": route.errors})
        self.add_pending(-1)
        await self.count_busy(fallback_of or node.id, -1)
        await self.arrive(fallback_of or node.id, route.decisions)
        await self.recheck_join(fallback_of or node.id)
        await self.release_held_loops(fallback_of or node.id)

    async def settle(self) -> None:
        """CONTRACT §5.8: completed when nothing is pending, queued, running, sleeping or awaiting."""
        m = await self.meta()
        if m.status not in (RunStatus.RUNNING, RunStatus.AWAITING):
            return
        if m.pending > 0:
            if m.status == RunStatus.AWAITING:
                self.set_meta(status=RunStatus.RUNNING)
            return
        if m.awaiting_nodes:
            if m.status != RunStatus.AWAITING:
                self.set_meta(status=RunStatus.AWAITING)
                self.t.event({"type": "run_awaiting", "ts": self.engine.clock(), "nodes": list(m.awaiting_nodes)})
                if (parent := m.parent) is not None:  # a subflow that waits makes its parent node wait too
                    self.schedule(Job(parent.run_id, parent.node_id, parent.seq, "child_wait", parent.attempt))
            return
        await self.finalize(RunStatus.COMPLETED, None)

    async def finalize(self, status: RunStatus, reason: str | None) -> None:
        """Write the run's final status, exactly once."""
        m = await self.meta()
        if m.status in FINAL_STATUSES:
            return
        self.engine.forget_queued(self.t.run_id)
        ts = self.engine.clock()
        self.set_meta(status=status)
        self.set_meta(reason=reason)
        self.set_meta(finished_at=ts)
        payload = None
        if status == RunStatus.COMPLETED:
            terminals = self.bp.terminal_nodes
            got = await self.t.get_many(STATE, [f"_outputs.{n}" for n in terminals])
            payload = {"outputs": {n: got[f"_outputs.{n}"] for n in terminals if f"_outputs.{n}" in got}}
        else:
            # nodes still queued or running will never finish in this run: say so, rather than leave them "running"
            cancelled = status == RunStatus.CANCELLED
            why = "the run was cancelled" if cancelled else "the run failed"
            for node_id, rec in (await read_nodes(self.t, self.bp.node_map)).items():
                if rec.status in ACTIVE_NODE:
                    if cancelled and rec.status == NodeStatus.RUNNING:
                        self.t.event({"type": "attempt_cancelled", "ts": ts, "node": node_id,
                                      "attempt": rec.attempt, "started_at": rec.attempt_started_at,
                                      "worker": rec.worker, "error": f"stopped: {why}"})
                    end = NodeStatus.CANCELLED if cancelled else NodeStatus.FAILED
                    write_node(self.t, node_id, evolve(
                        rec, status=end, finished_at=ts, token=None,
                        error=rec.error or f"stopped: {why} before it finished"))
        self.t.final = ({"status": status.value, "reason": reason, "payload": payload}, self.engine.settings.ttl_s)
        self.t.event({"type": "run_finished", "ts": ts, "status": status.value, "reason": reason})
        if (parent := m.parent) is not None:
            self.schedule(Job(parent.run_id, parent.node_id, parent.seq, "child", parent.attempt))

    async def lose_attempt(self, node: NodeDef, rec: NodeRecord, job: Job, worker: str) -> tuple[NodeRecord, bool]:
        """The attempt ``job`` of ``node`` was lost with ``worker`` (CONTRACT §6.1): record it, and fail the node
        when that makes ``max(2, maxRetries)`` lost attempts in a row. Returns the record with the count, and
        whether the node failed."""
        lost = (rec.lost_in_row or 0) + 1
        rec = evolve(rec, lost_in_row=lost)
        self.t.event(_lost_event(node.id, job, rec.attempt_started_at, worker, self.engine.clock()))
        runner = node if job.kind == JobKind.EXEC else self.bp.node_map[node.config.fallback or ""]
        if lost < _lost_limit(runner):
            return rec, False
        error = f"lost {lost} attempts in a row: the worker running it died each time (the last: {worker})"
        await self.fail_node(node, rec, job, error, False, retry=False, event=False)
        return rec, True

    async def lose_item(self, node: NodeDef, rec: NodeRecord, st: BatchItem, job: Job,
                        worker: str) -> tuple[BatchItem, bool]:
        """``lose_attempt`` for one batch item: too many lost in a row fail the item, and so the batch node."""
        lost = (st.lost_in_row or 0) + 1
        st = evolve(st, lost_in_row=lost)
        self.t.event(_lost_event(node.id, job, st.attempt_started_at, worker, self.engine.clock()))
        if lost < _lost_limit(node):
            return st, False
        error = f"item {job.item}: lost {lost} attempts in a row (the worker running it died each time; the last: {worker})"
        write_item(self.t, node.id, job.seq, job.item, BatchItem(ItemStatus.FAILED, job.attempt, error=error))
        await self.fail_node(node, rec, Job(job.run_id, node.id, job.seq, "exec", node.config.max_retries),
                             error, False, retry=False, event=False)
        return st, True

    async def fail_node(self, node: NodeDef, rec: NodeRecord, job: Job, error: str, fatal: bool, *,
                        retry: bool = True, event: bool = True, tb: str | None = None) -> None:
        """An attempt failed: retry with backoff, else run the fallback, else fail the run. ``retry=False``:
        no further attempt (lost attempts in a row); ``event=False``: the attempt is already recorded."""
        ts = self.engine.clock()
        phase = JobKind.FALLBACK if job.kind == JobKind.FALLBACK else JobKind.EXEC
        owner = node if phase == JobKind.EXEC else self.bp.node_map[node.config.fallback or ""]
        cfg = owner.config
        attempt = (rec.attempt or 1) if job.kind in (JobKind.GATHER, JobKind.CHILD) else job.attempt
        if event:
            self.t.event({"type": "attempt_failed", "ts": ts, "node": node.id, "phase": phase.value,
                          "attempt": attempt, "started_at": rec.attempt_started_at,
                          "error": error, "worker": self.engine.worker_id, **({"traceback": tb} if tb else {})})
        # this attempt ended (or ends the node), so it was not lost; whatever comes next is a fresh job
        rec = evolve(rec, lost_in_row=0, recovery=0, job=None)
        if retry and not fatal and attempt < cfg.max_retries and job.kind != JobKind.ITEM:
            delay = cfg.retry_delay_ms * (2 ** (attempt - 1))
            if event:
                self.t.events[-1]["retry_in_ms"] = delay
            write_node(self.t, node.id, evolve(rec, status=NodeStatus.QUEUED, attempt=attempt + 1, error=error,
                                                child=None, items=None, token=None, retry_at=ts + delay))
            self.schedule(Job(self.t.run_id, node.id, rec.seq, phase.value, attempt + 1, not_before_ms=ts + delay))
            return
        if not fatal and phase == JobKind.EXEC and node.config.fallback:
            write_node(self.t, node.id, evolve(rec, status=NodeStatus.QUEUED, phase=JobKind.FALLBACK, attempt=1,
                                                exec_attempts=attempt, error=error, fallback=node.config.fallback,
                                                child=None, items=None, token=None))
            self.schedule(Job(self.t.run_id, node.id, rec.seq, "fallback", 1))
            return
        if phase == JobKind.FALLBACK:
            error = f"{rec.error}; fallback {node.config.fallback!r} failed: {error}"
        write_node(self.t, node.id, evolve(rec, status=NodeStatus.FAILED, error=error, finished_at=ts,
                                            runs=rec.runs + 1, token=None))
        self.add_pending(-1)
        self.set_meta(failed_node=node.id)
        await self.finalize(RunStatus.FAILED, f"node {node.id!r} failed: {error}")


def _lost_event(node_id: str, job: Job, started_at: int | None, worker: str, ts: int) -> dict[str, Any]:
    return {"type": "attempt_lost", "ts": ts, "node": node_id, "attempt": job.attempt,
            "started_at": started_at, "worker": worker,
            "error": f"worker {worker} stopped heartbeating", **({"item": job.item} if job.item >= 0 else {})}


def _lost_limit(node: NodeDef) -> int:
    """Lost attempts in a row that fail a node (CONTRACT §6.1: ``maxRetries``). At least two, so that one
    crash never fails a node, even one with a single attempt (§6: a SIGKILLed worker loses nothing), while a
    node that kills its worker every time still ends."""
    return max(2, node.config.max_retries)

