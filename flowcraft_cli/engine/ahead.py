"""A chain's quick steps committed together (a group commit, on workers: ``Engine.fuse_steps``).

A step that finished its node, and whose commit would claim its one successor for its own worker (an inline
step), runs that successor's node first, unclaimed, and then commits both outcomes in one transaction; and so
on down the chain, for up to ``GROUP_MAX`` nodes and ``AHEAD_S`` after the first of them finished. A chain of
quick nodes then costs one commit (one round trip, one script) per group instead of one per node.

A node run ahead (``Ahead``) sees the run as its predecessors left it: their outputs and context writes reach
its ``ctx.context`` reads and its input from this module's snapshot of them (JSON, so no node can change what
another returned), and its route's expressions read them too. It runs under the idempotency key and the claim
token it will be committed with.

The group ends early at a node that is still running at ``AHEAD_S``, or failed: the commit of those before it
claims that node for this worker as any inline claim does, with the token and start time it runs under, and
hands it on as the next inline step with its running node (``InlineStep.running``), which the step then
awaits instead of calling the node again. A commit that does not claim it (the run was cancelled, the step was
fenced off) drops its result once it ends, as a fenced step's.

What a group does not commit is lost with its worker, as a node's result is before its commit: the first node
of the group is recovered as usual (its claim is held and listed, or its queue job is redelivered), and the
rest run again after it. A node that kills its worker therefore costs the group's first node one lost attempt;
a step recovered once (or a redelivered job) runs no node ahead, so the next loss is charged to the right
node. Only steps that go on down a plain chain join a group: a successor that is the one target of an
unconditional edge or a taken one, with that one predecessor, a function node with no ``inputs``, outside any
loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..blueprint import BUILTINS, Blueprint, NodeDef
from ..errors import UndecodableValue
from ..ids import claim_token
from ..jobs import Job
from ..node_api import _MISSING
from ..store import MISSING, NODES, RUN, dumps, parse_json
from . import eager
from .builtins import function
from .reads import prefetch_commit, read_route
from .routing import Route, expression_names
from .state import REF, InlineStep, NodeRecord, NodeStatus, RunStatus, read_node

if TYPE_CHECKING:
    from .lifecycle import RunTxn
    from .step import Step

# nodes a group commit holds at most on a worker (its transaction's size, the work a lost worker redoes);
# in-process, where no worker is lost and a transaction costs no round trip, the runtime sets more
GROUP_MAX = 16
AHEAD_S = 0.02  # how long after the group's first node finished its later ones may still join it
_SCOPE = frozenset({"result", "input"})  # what an edge's expressions see without reading the run


@dataclass(slots=True)
class Ahead:
    """A successor's node, run ahead of its predecessor's commit."""

    step: Step  # its step as it will be claimed: job, token (``step.preclaimed``)
    given: str  # the input it was given, as JSON (the node may change the copy it got)
    started: int
    task: asyncio.Future[tuple[Any, str | None, dict[str, Any]]]  # (a task, or done already: eager.start)
    ended: int = 0
    output: Any = None
    action: str | None = None
    writes: dict[str, Any] = field(default_factory=dict)
    route: Route | None = None

    @property
    def claim(self) -> InlineStep:
        """The claim it runs under: its job, token, and the input object its node was called with."""
        assert self.step.preclaimed is not None
        return self.step.preclaimed


def next_in_chain(bp: Blueprint, node: NodeDef, route: Route) -> tuple[NodeDef, Any] | None:
    """The successor ``route`` fires that may run ahead of ``node``'s commit, and the value it delivers."""
    if route.errors or len(route.decisions) != 1 or not route.decisions[0].taken:
        return None
    decision = route.decisions[0]
    tgt = bp.node_map[decision.target]
    if tgt.id == node.id or tgt.uses in BUILTINS or tgt.inputs is not None \
            or len(bp.predecessors.get(tgt.id, ())) != 1 or bp.is_loop_controller(tgt.id) \
            or bp.loops_containing.get(tgt.id) or bp.loops_containing.get(node.id):
        return None
    return tgt, decision.value


def may_lead(step: Step) -> bool:
    """May ``step`` run its successors ahead of its commit? A fresh step of a plain node that claims them for
    its own worker: not one recovered or delivered again (a node ahead of it may be what killed a worker), nor
    one whose worker's lease may have lapsed since its job reached it (paused, cut off from Redis: the step
    may have been recovered elsewhere, and what it ran ahead would run twice)."""
    job, engine = step.job, step.engine
    return engine.fuse_steps and engine.inline_steps and step.claimed and not job.recovery \
        and job.kind == "exec" and (step.preclaimed is not None or step.fresh) \
        and (engine.lease_held is None or engine.lease_held(step.born))


async def succeed_ahead(step: Step, output: Any, action: str | None, writes: Mapping[str, Any],
                        node_input: Any, route: Route) -> list[tuple[str, Job]]:
    """``step``'s node succeeded (``route``): run the chain after it ahead, then commit the group."""
    engine, bp, run_id = step.engine, step.bp, step.run_id
    finished = engine.clock()  # (timestamps are the engine's clock; the limit is the event loop's, monotonic)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + AHEAD_S
    done: list[Ahead] = []
    last: Ahead | None = None  # still running, or failed: claimed by the commit, then run on as an inline step
    # context fields the group wrote: JSON text, or _MISSING (deleted). Its nodes read it as they run, without
    # a copy: it grows only once the node before has ended, and a node still running ends the group
    seen: dict[str, Any] = {}
    node, out, wrote, rt = step.node, output, writes, route
    try:
        while len(done) + 1 < engine.group_max and loop.time() < deadline:
            nxt = next_in_chain(bp, node, rt)
            # no node starts in a run that ended (cancelled, or failed in another branch): as this process knows
            # the run, and asked anew when the step's own node ran long (another process may have ended it)
            if nxt is None or not await _goes_on(step, fresh=not done and loop.time() - step.born > AHEAD_S):
                break
            tgt, value = nxt
            given = _saw(seen, node, out, wrote)
            seen[f"_inputs.{tgt.id}"] = given if value is REF else dumps(value)
            seq = await _next_seq(step, tgt.id)
            if seq is None:
                break
            job = Job(run_id, tgt.id, seq)
            tgt_input = parse_json(seen[f"_inputs.{tgt.id}"])
            ahead_step = type(step)(engine, bp, tgt, job,
                                    InlineStep(job, claim_token(), None, tgt_input, step.list_as))  # type: ignore[arg-type]
            if engine.on_claim is not None:
                engine.on_claim(bp.id, job)
            last = Ahead(ahead_step, seen[f"_inputs.{tgt.id}"], engine.clock(), eager.start_here(
                function.call_node(ahead_step, tgt, tgt_input, 1, ahead=seen)))
            if not await _ended(last, seen, deadline) or last.route is None:
                break  # still running, or failed: the commit claims it, and it goes on as an inline step
            done.append(last)
            node, out, wrote, rt = tgt, last.output, last.writes, last.route
            last = None
        scheduled = await step.commit(_group_commit(step, output, action, writes, route, finished, done, last),
                                      lead=True)
    except BaseException:
        if last is not None:
            last.task.cancel()
        raise
    if last is not None:
        got = step.inline[0] if step.inline else None
        if got is not None and _claimed_as(got, last):
            got.running = last.task
            got.node_input = last.claim.node_input  # what it runs on (and may change): its route sees that
        else:
            # the commit claimed it not (the run ended, the step was fenced off): it runs for nothing
            last.task.cancel()
            await drop(last.task)
    return scheduled


async def succeed_siblings(step: Step, output: Any, action: str | None, writes: Mapping[str, Any],
                           route: Route) -> list[tuple[str, Job]]:
    """``step``'s node succeeded (``route``), and steps claimed with it wait for this worker (``step.more``: the
    queued siblings a commit claimed at once, ``Engine.sibling_claims``, in-process): run their nodes now, one
    after another, and commit their outcomes with its own, in one transaction; for up to ``group_max`` nodes and
    ``AHEAD_S``. As in a chain's group, each sees the group's context writes before it. A sibling still running
    at the limit, or failed, ends the group and goes back to ``step.more`` (first) with its running node
    (``InlineStep.running``), as do those not started: they run next on this worker, each its own step."""
    engine, bp = step.engine, step.bp
    finished = engine.clock()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + AHEAD_S
    done: list[Ahead] = []
    last: Ahead | None = None
    seen: dict[str, Any] = {}  # the group's context writes, as in succeed_ahead
    node, out, wrote = step.node, output, writes
    try:
        while step.more and len(done) + 1 < engine.group_max and loop.time() < deadline:
            if step.more[0].running is not None:
                break  # its node runs (or ran) already, ahead of an earlier commit: its own step awaits it
            if not await _goes_on(step, fresh=False):
                break
            _saw(seen, node, out, wrote)
            claim = step.more.pop(0)
            sib = bp.node_map[claim.job.node_id]
            sib_step = type(step)(engine, bp, sib, claim.job, claim)
            if engine.on_claim is not None:
                engine.on_claim(bp.id, claim.job)
            last = Ahead(sib_step, "", claim.record.attempt_started_at or finished, eager.start_here(
                function.call_node(sib_step, sib, claim.node_input, claim.job.attempt, ahead=seen)))
            ended = await _ended(last, seen, deadline)
            step.waited = step.waited or sib_step.waited or not last.task.done()  # (see Step.waited)
            if not ended:
                break  # still running, or failed: its own step takes it over
            done.append(last)
            node, out, wrote = sib, last.output, last.writes
            last = None
        scheduled = await step.commit(_sibling_commit(step, output, action, writes, route, finished, done))
    except BaseException:
        if last is not None:
            last.task.cancel()
        raise
    back = [] if last is None else [last]
    if step.stale:
        back = [*done, *back]  # (its own commit was refused: each runs on as its own step, and commits or not)
    else:
        for committed in done:
            engine.active_tokens.discard(committed.claim.token)  # ended here
    for a in back:
        a.claim.running = a.task
    step.more[:0] = [a.claim for a in back]
    return scheduled


def _saw(seen: dict[str, Any], node: NodeDef, output: Any, writes: Mapping[str, Any]) -> str:
    """Add what ``node`` left to the group's writes (``seen``: JSON text, or _MISSING): its context writes and
    its output, whose JSON it returns."""
    for key, v in writes.items():
        seen[key] = v if v is _MISSING else dumps(v)
    seen[f"_outputs.{node.id}"] = encoded = dumps(output)
    return encoded


async def _ended(ahead: Ahead, seen: Mapping[str, Any], deadline: float) -> bool:
    """Wait for a node run ahead until ``deadline`` (event loop time); if it succeeded, take its outcome and
    route it. False: it still runs, failed, or its route reads a value that is not JSON (its own step meets that
    again, and fails the run for it): the group ends before it."""
    step = ahead.step
    engine, bp, node = step.engine, step.bp, step.node
    if not ahead.task.done():  # (a node that never waits is done already)
        await asyncio.wait((ahead.task,), timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
    if not ahead.task.done() or ahead.task.cancelled() or ahead.task.exception() is not None:
        return False
    ahead.ended = engine.clock()
    ahead.output, ahead.action, ahead.writes = ahead.task.result()
    # its edges' expressions see the group's writes too (read_scope lays ``writes`` over the run's)
    scope = ahead.writes
    if expression_names(bp.out_edges[node.id]) - _SCOPE:
        scope = {**{k: v if v is _MISSING else parse_json(v) for k, v in seen.items()}, **ahead.writes}
    try:
        ahead.route = await read_route(engine.store, bp, node, step.run_id, ahead.output, ahead.action, scope,
                                       ahead.claim.node_input)
    except UndecodableValue:
        return False
    return True


def _sibling_commit(step: Step, output: Any, action: str | None, writes: Mapping[str, Any], route: Route,
                    finished: int, done: list[Ahead]) -> Any:
    """The commit of ``step``'s outcome and of each sibling run after it that still holds its claim (a sibling
    whose claim is gone, its run ended, is dropped as a fenced step's result is)."""
    async def fn(run: RunTxn, rec: NodeRecord) -> None:
        await run.complete(step.node, rec, output, action, route, writes, at=finished)
        for sibling in done:
            claim = sibling.claim
            got = await read_node(run.t, claim.job.node_id)
            if got is None or got.status != NodeStatus.RUNNING or got.token != claim.token \
                    or got.seq != claim.job.seq:
                continue
            await prefetch_commit(run.t, step.bp, claim.job.node_id)
            assert sibling.route is not None
            await run.complete(sibling.step.node, got, sibling.output, sibling.action, sibling.route,
                               sibling.writes, at=sibling.ended)
    return fn


def _group_commit(step: Step, output: Any, action: str | None, writes: Mapping[str, Any], route: Route,
                  finished: int, done: list[Ahead], last: Ahead | None) -> Any:
    """The commit of ``step``'s outcome and of each node run ahead after it, in order, each as its predecessor's
    commit claimed it; the first one found not claimed so (its run moved on) and those after it are left out."""
    claim_as = {a.claim.job.node_id: (a.claim.token, a.started) for a in (*done, *([last] if last else []))}

    async def fn(run: RunTxn, rec: NodeRecord) -> None:
        run.claim_as = claim_as
        await run.complete(step.node, rec, output, action, route, writes, at=finished)
        for ahead in done:
            got = run.inline[0] if run.inline else None
            if got is None or not _claimed_as(got, ahead):
                return  # (a claim of it with another job stays: it runs as an ordinary inline step)
            run.inline.clear()
            await prefetch_commit(run.t, step.bp, ahead.step.node.id)
            assert ahead.route is not None
            await run.complete(ahead.step.node, got.record, ahead.output, ahead.action, ahead.route, ahead.writes,
                               at=ahead.ended)
    return fn


def _claimed_as(got: InlineStep, ahead: Ahead) -> bool:
    """Is the inline claim a commit made the one ``ahead``'s node ran under (job, token, input)?"""
    return got.token == ahead.claim.token and got.job == ahead.claim.job and dumps(got.node_input) == ahead.given


async def _goes_on(step: Step, *, fresh: bool) -> bool:
    """Is the run still running, as this process remembers it (``fresh``: as Redis holds it)?"""
    store = step.engine.store
    try:
        got = await (store.read if fresh else store.peek)(step.run_id, RUN, ["status"])
    except UndecodableValue:
        return False  # (its commit meets it, and says so)
    return bool(got[0] == RunStatus.RUNNING.value)


async def _next_seq(step: Step, node_id: str) -> int | None:
    """The firing a node's next one will be (its record's seq + 1), as this process knows the run."""
    try:
        raw = (await step.engine.store.peek(step.run_id, NODES, [node_id]))[0]
        if raw is MISSING:
            return 1
        return NodeRecord.from_json(raw).seq + 1 if isinstance(raw, dict) else None
    except (UndecodableValue, KeyError, TypeError, ValueError):
        return None  # not a record: the group stops here, and the commit meets it and says so


async def drop(task: asyncio.Future[Any]) -> None:
    """Let a node run ahead end, and drop its outcome."""
    if not task.done():
        await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()  # (retrieved: no "never retrieved" warning)
