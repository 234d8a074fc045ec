"""FlowRuntime: a whole run in this process, over a MemoryStore — no Redis. Jobs become asyncio tasks;
delays (retry backoff, sleep) are real waits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .blueprint import Blueprint
from .engine import Engine, EngineSettings, Handled, now_ms
from .jobs import Job
from .registry import NodeRegistry
from .store import MemoryStore, Store
from .view import RunView, read_run

log = logging.getLogger("flowcraft.runtime")


@dataclass
class RunResult:
    run_id: str
    blueprint_id: str
    status: str
    reason: str | None
    context: dict[str, Any]
    outputs: dict[str, Any]
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
        self.engine.on_claim = self._started
        self._taken: set[str] = set()  # ids of queued jobs a commit claimed (Handled.unqueued): not to run
        self._sem = asyncio.Semaphore(concurrency) if concurrency > 0 else None
        self._on_event = on_event
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, blueprint_id: str, run_input: Any = None, *, run_id: str | None = None) -> RunResult:
        run_id, scheduled = await self.engine.start_run(blueprint_id, {} if run_input is None else run_input,
                                                        run_id=run_id)
        await self._drive(scheduled)
        return await self.result(run_id)

    async def resume(self, run_id: str, node_id: str | None = None, *, output: Any = None,
                     action: str | None = None) -> RunResult:
        await self._drive(await self.engine.resume(run_id, node_id, output=output, action=action))
        return await self.result(run_id)

    async def retry(self, run_id: str) -> RunResult:
        """Run a failed run on from where it failed (its failed nodes again, fresh attempts)."""
        await self._drive(await self.engine.retry(run_id))
        return await self.result(run_id)

    async def cancel(self, run_id: str) -> bool:
        changed, scheduled = await self.engine.cancel(run_id)
        await self._drive(scheduled)
        return changed

    async def result(self, run_id: str) -> RunResult:
        view = await read_run(self.store, self.engine.blueprints, run_id)
        return RunResult(run_id, view.blueprint_id, view.status, view.reason, view.context, view.outputs, view)

    async def _drive(self, scheduled: list[tuple[str, Job]]) -> None:
        """Run jobs until none is left: the run then rests (completed, failed, cancelled or awaiting)."""
        self._spawn(scheduled)
        while self._tasks:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                self._tasks.discard(task)
                task.result()  # an engine bug must surface, not vanish
        self._taken.clear()  # no task left to skip its job (one whose step was claimed as it started ran it)

    def _spawn(self, scheduled: list[tuple[str, Job]]) -> None:
        for owner, job in scheduled:
            task = asyncio.get_running_loop().create_task(self._run_job(owner, job))
            self._tasks.add(task)

    async def _run_job(self, owner: str, job: Job) -> None:
        await self.store.ack_jobs(owner, [job.job_id])
        delay = (job.not_before_ms - now_ms()) / 1000
        if delay > 0:
            await asyncio.sleep(delay)
        if self._sem is None:
            handled = await self._handle_chain(job)
        else:
            async with self._sem:
                handled = await self._handle_chain(job)
        if handled.retry_after_s is not None:  # cannot happen in-process (one blueprint set), kept for symmetry
            await asyncio.sleep(handled.retry_after_s)
            self._spawn([(owner, job)])
        self._spawn(handled.scheduled)

    async def _handle_chain(self, job: Job) -> Handled:
        """Handle ``job``, then the successors its commits claim for this task, one after another."""
        if job.job_id in self._taken:  # an earlier commit claimed its step, and its task ran it
            self._taken.discard(job.job_id)
            return Handled()
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

    def _started(self, blueprint_id: str, job: Job) -> None:
        if self._on_event:
            self._on_event("start", job)
