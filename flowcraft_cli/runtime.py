"""FlowRuntime: a whole run in this process, over a MemoryStore — no Redis. Jobs become asyncio tasks;
delays (retry backoff, sleep) are real waits."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .blueprint import Blueprint
from .engine import RESTING_STATUSES, Engine, EngineSettings, Handled, now_ms
from .jobs import Job
from .registry import NodeRegistry
from .store import MISSING, RUN, MemoryStore, Store
from .view import RunView, read_run

log = logging.getLogger("flowcraft.runtime")
_RESTING = {status.value for status in RESTING_STATUSES}


@dataclass
class RunResult:
    run_id: str
    blueprint_id: str
    status: str
    reason: str | None
    # (not in the repr: a run's whole context, which asyncio formats when the task that ran the run ends)
    context: dict[str, Any] = field(repr=False)
    outputs: dict[str, Any] = field(repr=False)
    view: RunView = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """The run document, the same shape ``inspect --json`` prints (CONTRACT §10)."""
        return self.view.to_json()


class FlowRuntime:
    """Runs blueprints in-process. ``concurrency`` caps how many steps run at once."""

    def __init__(
        self,
        blueprints: Mapping[str, Blueprint],
        registry: NodeRegistry,
        *,
        concurrency: int = 32,
        store: Store | None = None,
        on_event: Callable[[str, Job], None] | None = None,
    ) -> None:
        self.store = store or MemoryStore()
        self.engine = Engine(self.store, blueprints, registry, worker_id="local",
                             settings=EngineSettings(ttl_s=0))
        # a step's commit claims the successor it makes ready, which its task runs next, as a worker slot
        # does (one transaction a node, not a claim and a commit); a commit that makes none ready claims a
        # queued sibling instead (a fan-out's branches), whose own task then ends without a transaction
        self.engine.inline_steps = self.engine.take_queued = True
        # ... and runs the quick steps of a chain after it ahead of its commit, committing them with it
        # (engine.ahead): a chain costs a transaction per group of nodes. A node starts when it is claimed,
        # whether by a step of its own or ahead of its predecessor's commit
        self.engine.fuse_steps = True
        self.engine.group_max = 64  # (a group still ends AHEAD_S after its first node ended)
        # ... and, for a fan-out's branches, a commit that claims a queued sibling claims several: the step given
        # them runs their nodes after its own and commits them with it (engine.ahead.succeed_siblings)
        self.engine.sibling_claims = 16
        if on_event is not None:
            # (not a method of this runtime: the engine would hold the runtime that holds it, and a finished
            # runtime's whole store would wait for the cyclic collector instead of being freed when dropped)
            self.engine.on_claim = lambda blueprint_id, job: on_event("start", job)
        self._taken: set[str] = set()  # ids of queued jobs a commit claimed (Handled.unqueued): not to run
        # jobs ready to run, taken by at most ``concurrency`` runner tasks (0: a runner a job): a job a commit
        # claimed meanwhile (a fan-out's branch run in a sibling group) costs no task of its own
        self._concurrency = concurrency
        self._ready: deque[tuple[str, Job]] = deque()
        self._runners = 0
        self._driving = False  # a call is running this runtime's jobs (FlowRuntime._drive)
        self._waiters: list[asyncio.Future[None]] = []  # calls made meanwhile, waiting for their run to rest
        self._on_event = on_event
        self._tasks: set[asyncio.Task[None]] = set()  # runners, and jobs waiting out a delay before they are ready

    async def run(self, blueprint_id: str, run_input: Any = None, *, run_id: str | None = None) -> RunResult:
        run_id, scheduled = await self.engine.start_run(blueprint_id, {} if run_input is None else run_input,
                                                        run_id=run_id)
        await self._drive(scheduled, run_id)
        return await self.result(run_id)

    async def resume(self, run_id: str, node_id: str | None = None, *, output: Any = None,
                     action: str | None = None) -> RunResult:
        await self._drive(await self.engine.resume(run_id, node_id, output=output, action=action), run_id)
        return await self.result(run_id)

    async def retry(self, run_id: str) -> RunResult:
        """Run a failed run on from where it failed (its failed nodes again, fresh attempts)."""
        await self._drive(await self.engine.retry(run_id), run_id)
        return await self.result(run_id)

    async def cancel(self, run_id: str) -> bool:
        changed, scheduled = await self.engine.cancel(run_id)
        await self._drive(scheduled)
        return changed

    async def result(self, run_id: str) -> RunResult:
        view = await read_run(self.store, self.engine.blueprints, run_id)
        return RunResult(run_id, view.blueprint_id, view.status, view.reason, view.context, view.outputs, view)

    async def _drive(self, scheduled: list[tuple[str, Job]], run_id: str | None = None) -> None:
        """Run jobs until none is left: the run then rests (completed, failed, cancelled or awaiting). A call made
        while another drives this runtime's jobs (a node that cancels its own run or runs another flow, a second
        run started beside the first) leaves its jobs to that one's runners and waits only until ``run_id`` rests
        (not at all without one): waiting for every job would wait for the very node that called."""
        self._spawn(scheduled)
        while self._driving:
            if run_id is None or await self._rests(run_id):
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self._driving = True
        try:
            while self._tasks:
                done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._tasks.discard(task)
                    task.result()  # an engine bug must surface, not vanish
        finally:
            self._driving = False
            self._progressed()
        assert not self._ready, "ready jobs left with no runner"
        self._taken.clear()  # no task left to skip its job (one whose step was claimed as it started ran it)

    async def _rests(self, run_id: str) -> bool:
        status = (await self.store.read(run_id, RUN, ["status"]))[0]
        return status is MISSING or status in _RESTING

    def _progressed(self) -> None:
        """A job was handled (or the driving ended): calls waiting for their run to rest look again."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _spawn(self, scheduled: list[tuple[str, Job]]) -> None:
        loop = asyncio.get_running_loop()
        now = None
        for owner, job in scheduled:
            if job.not_before_ms:
                now = now or now_ms()
                if job.not_before_ms > now:  # (a retry's backoff, a sleep)
                    self._tasks.add(loop.create_task(self._later(owner, job, (job.not_before_ms - now) / 1000)))
                    continue
            self._ready.append((owner, job))
        want = len(self._ready) if self._concurrency <= 0 else min(len(self._ready), self._concurrency - self._runners)
        for _ in range(want):
            self._runners += 1
            self._tasks.add(loop.create_task(self._runner()))

    async def _later(self, owner: str, job: Job, delay: float) -> None:
        await asyncio.sleep(delay)
        self._spawn([(owner, job)])

    async def _runner(self) -> None:
        """Run ready jobs, one after another, until none is left."""
        try:
            while self._ready:
                owner, job = self._ready.popleft()
                await self.store.ack_jobs(owner, [job.job_id])
                if job.job_id in self._taken:  # an earlier commit claimed its step, and its runner ran it
                    self._taken.discard(job.job_id)
                    continue
                handled = await self._handle_chain(job)
                if handled.retry_after_s is not None:  # cannot happen in-process (one blueprint set), for symmetry
                    later = self._later(owner, job, handled.retry_after_s)
                    self._tasks.add(asyncio.get_running_loop().create_task(later))
                self._spawn(handled.scheduled)
                if self._waiters:
                    self._progressed()
        finally:
            self._runners -= 1  # (no wait between the last look at the queue and this: no job is left unseen)

    async def _handle_chain(self, job: Job) -> Handled:
        """Handle ``job``, then the successors its commits claim for this task, one after another."""
        handled = await self.engine.handle(job, first=True)
        while True:
            self._taken.update(j for j in handled.unqueued if j != job.job_id)
            if self._on_event:
                self._on_event("end", job)
            if handled.inline is None:
                return handled
            self._spawn(handled.scheduled)
            job = handled.inline.job
            handled = await self.engine.handle(job, handled.inline, more=handled.more)
