"""A run's lifecycle inside one transaction (``RunTxn``): fire a node, deliver its decisions to the joins
and loops of its successors, complete or fail it, settle and finalize the run. Every method reads and writes
through the transaction's ``Txn``; nothing here does I/O of its own."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..blueprint import Blueprint, JoinStrategy, NodeDef
from ..ids import field_name
from ..jobs import Job
from ..node_api import _MISSING
from ..store import BATCH, JOINS, NODES, OUTBOX, RUN, STATE, Txn
from .routing import REF, Decision, Route
from .state import (
    ACTIVE_NODE,
    FINAL_STATUSES,
    META_FIELDS,
    NodeStatus,
    RunStatus,
    count_field,
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
        self._meta: dict[str, Any] | None = None

    async def meta(self) -> dict[str, Any]:
        if self._meta is None:
            got = await self.t.get_many(RUN, META_FIELDS)
            self._meta = {k: got.get(k) for k in META_FIELDS}
            self.extend_expiry(self._meta.get("keep_until"))
            self.t.ancestors = list(self._meta.get("ancestors") or [])  # they live as long as this run
        return self._meta

    def extend_expiry(self, keep_until: int | None) -> None:
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
        await self.count_busy(node_id, +1)
        self.schedule(Job(self.t.run_id, node_id, seq))

    async def count_busy(self, node_id: str, delta: int) -> None:
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
            if rec and rec["status"] in ACTIVE_NODE:
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
                trigger = (src, Decision(tgt, True, arrivals[field_name(tgt, gen, src)].get("v", REF)))
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
        if not rec or rec.get("fired_gen", rec["gen"]) == rec["gen"] or rec["status"] in ACTIVE_NODE:
            return
        gen = rec["gen"]
        counts = await self.t.get(JOINS, count_field(node_id, gen))
        if counts:
            work: deque[tuple[str, Decision]] = deque()
            await self._decide_join(node_id, self.bp.node_map[node_id], rec, gen, tuple(counts), None, work)
            await self._drain(work)

    async def _record_arrival(self, tgt: str, gen: int, src: str, d: Decision) -> tuple[int, int] | None:
        key = field_name(tgt, gen, src)
        if await self.t.get(JOINS, key) is not None:
            return None  # this predecessor already arrived in this generation
        self.t.put(JOINS, key, {"t": d.taken} if d.value is REF or not d.taken else {"t": True, "v": d.value})
        decided, taken = await self.t.get(JOINS, count_field(tgt, gen), [0, 0])
        counts = (decided + 1, taken + int(d.taken))
        self.t.put(JOINS, count_field(tgt, gen), list(counts))
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
                held = {"src": src, **({} if d.value is REF else {"v": d.value})}
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
            if not rec or not rec.get("held") or rec["status"] in ACTIVE_NODE or await self._body_busy(controller):
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
        if d.value is not REF:
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
            if rec and rec["status"] in ACTIVE_NODE:
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
                self.t.put(JOINS, count_field(node_id, new_gen), [decided, taken])
            for key in old:
                self.t.delete(JOINS, key)
            self.t.delete(JOINS, count_field(node_id, old_gen))

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
        await self.count_busy(fallback_of or node.id, -1)
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
                if rec["status"] in ACTIVE_NODE:
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



def _lost_event(node_id: str, job: Job, holder: Mapping[str, Any], worker: str, ts: int) -> dict[str, Any]:
    return {"type": "attempt_lost", "ts": ts, "node": node_id, "attempt": job.attempt,
            "started_at": holder.get("attempt_started_at"), "worker": worker,
            "error": f"worker {worker} stopped heartbeating", **({"item": job.item} if job.item >= 0 else {})}


def _lost_limit(node: NodeDef) -> int:
    """Lost attempts in a row that fail a node (CONTRACT §6.1: ``maxRetries``). At least two, so that one
    crash never fails a node, even one with a single attempt (§6: a SIGKILLed worker loses nothing), while a
    node that kills its worker every time still ends."""
    return max(2, node.config.max_retries)

