"""ArqAdapter: the distributed runtime's public door (seed API). Workers run one node step per arq job
through the shared engine; clients start, resume, cancel and read runs."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arq import Retry
from arq.worker import Worker, func
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..blueprint import Blueprint
from ..engine import Engine, EngineSettings
from ..jobs import Job
from ..registry import NodeRegistry
from ..store import OUTBOX
from ..view import RunView, read_run
from . import keys
from .coordination import RedisCoordinationStore
from .queue import STEP_FUNCTION, ArqQueue, arq_pool_for
from .redis_store import RedisStore

log = logging.getLogger("flowcraft.worker")

DEFAULT_QUEUE = "flowcraft-queue"
# Test-only fault injection (like a failpoint): FLOWCRAFT_FAILPOINT=after-commit:<node_id> makes this worker
# process exit right after committing that node's step and before queueing what follows.
_FAILPOINT = os.environ.get("FLOWCRAFT_FAILPOINT", "")


@dataclass
class ReconcileOutcome:
    planned: list[Job]
    enqueued: list[str]
    note: str = ""


class ArqAdapter:
    """``ArqAdapter(connection=redis, queue_name=..., coordination_store=..., runtime_options={"registry":
    registry, "blueprints": blueprints})``. ``blueprints`` may be a mapping id -> Blueprint or a list."""

    def __init__(
        self,
        *,
        connection: Redis,
        queue_name: str = DEFAULT_QUEUE,
        coordination_store: RedisCoordinationStore | None = None,
        runtime_options: Mapping[str, Any] | None = None,
        concurrency: int = 10,
        job_timeout_s: float = 300,
        ttl_s: int = 86400,
        running_ttl_s: int = 7 * 86400,
        version_grace_s: float = 300,
        poll_delay_s: float = 0.02,
        shutdown_wait_s: float = 10,
        worker_id: str | None = None,
    ) -> None:
        options = dict(runtime_options or {})
        blueprints = options.get("blueprints") or {}
        if not isinstance(blueprints, Mapping):
            blueprints = {bp.id: bp for bp in blueprints}
        registry = options.get("registry") or NodeRegistry()
        self.redis = connection
        self.queue_name = queue_name
        self.coordination_store = coordination_store or RedisCoordinationStore(connection)
        self.blueprints: dict[str, Blueprint] = dict(blueprints)
        self.registry: NodeRegistry = registry
        self.concurrency = concurrency
        self.job_timeout_s = job_timeout_s
        self.poll_delay_s = poll_delay_s
        self.shutdown_wait_s = shutdown_wait_s
        # hostname:pid alone is not unique (two adapters in one process, containers that are all PID 1)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.store = RedisStore(connection, running_ttl_s=running_ttl_s)
        self.queue = ArqQueue(arq_pool_for(connection, queue_name), queue_name)
        # The lease must lapse before arq redelivers a lost job (its lock is job timeout + 10 s), and a
        # step never outlives the job timeout because the engine's own attempt timeout is shorter.
        self.engine = Engine(self.store, self.blueprints, self.registry, worker_id=self.worker_id,
                             settings=EngineSettings(ttl_s=ttl_s, running_ttl_s=running_ttl_s,
                                                     lease_s=job_timeout_s + 5, version_grace_s=version_grace_s,
                                                     max_attempt_s=max(1.0, job_timeout_s - 2)))
        self._worker: Worker | None = None
        self._stopping = asyncio.Event()

    # ---- client side

    async def start_run(self, blueprint_id: str, run_input: Any = None, *, run_id: str | None = None) -> str:
        run_id, scheduled = await self.engine.start_run(blueprint_id, {} if run_input is None else run_input,
                                                        run_id=run_id)
        await self.flush(scheduled)
        return run_id

    async def resume(self, run_id: str, node_id: str | None = None, *, output: Any = None,
                     action: str | None = None) -> None:
        await self.flush(await self.engine.resume(run_id, node_id, output=output, action=action))

    async def cancel(self, run_id: str) -> bool:
        changed, scheduled = await self.engine.cancel(run_id)
        await self.flush(scheduled)  # e.g. a cancelled child run tells its parent
        return changed

    async def inspect(self, run_id: str, *, timeline: bool = True) -> RunView:
        return await read_run(self.store, self.blueprints, run_id, timeline=timeline)

    async def status(self, run_id: str) -> dict[str, Any] | None:
        return await self.store.read_status(run_id)

    async def reconcile(self, run_id: str, *, dry_run: bool = False) -> ReconcileOutcome:
        """Queue the steps of one run whose jobs are gone (lost between commit and queueing, or after a
        worker crash that arq did not recover). ``planned``: steps with no live job; ``enqueued``: the ids
        really added (another reconciler may have won the race for some)."""
        lock, token = f"reconcile:{run_id}", f"{self.worker_id}:{secrets.token_hex(4)}"
        if not dry_run and not await self.coordination_store.set_if_not_exist(lock, token, 30):
            return ReconcileOutcome([], [], "another reconciler holds this run")
        try:
            expected, outbox_ids = await self.engine.expected_jobs(run_id)
            alive = await self.queue.state_of([job.job_id for job in expected])
            planned = [job for job in expected if job.job_id not in alive]
            if dry_run:
                return ReconcileOutcome(planned, [])
            enqueued = await self.queue.enqueue(planned) if planned else []
            # only the entries read above: one written since then belongs to a step that queues it itself
            await self.store.ack_jobs(run_id, outbox_ids)
            if enqueued:
                log.info("reconciled run %s: queued %s", run_id, ", ".join(enqueued))
            return ReconcileOutcome(planned, enqueued)
        finally:
            if not dry_run:
                await self.coordination_store.release(lock, token)  # only if still ours

    async def flush(self, scheduled: list[tuple[str, Job]]) -> None:
        """Queue jobs a committed step decided, then clear them from their run's outbox."""
        if not scheduled:
            return
        await self.queue.enqueue(job for _, job in scheduled)
        by_owner: dict[str, list[str]] = {}
        for owner, job in scheduled:
            by_owner.setdefault(owner, []).append(job.job_id)
        for owner, ids in by_owner.items():
            await self.store.ack_jobs(owner, ids)

    # ---- worker side

    async def step(self, ctx: dict[str, Any], payload: Any = None, *extra: Any, **kwargs: Any) -> str:
        """The one arq function: decode strictly, run the step, queue what follows."""
        try:
            if extra or kwargs:
                raise ValueError("unexpected extra arguments")
            job = Job.from_dict(payload)
        except ValueError as e:
            log.error("job %s rejected, not run: %s", ctx.get("job_id"), e)
            return "rejected"
        try:
            handled = await self.engine.handle(job)
            if _FAILPOINT and _FAILPOINT == f"after-commit:{job.node_id}":
                os._exit(137)  # fault-injection for the crash tests: die between a commit and its queueing
            await self.flush(handled.scheduled)
            if (handled.note == "stale" or handled.note.startswith("run is")) and \
                    await self.redis.hlen(keys.kind_key(OUTBOX, job.run_id)):
                # a redelivered step that already happened: what it decided may have been lost between its
                # commit and the queueing (the worker died there), so finish that part now
                await self.reconcile(job.run_id)
        except (RedisError, OSError) as e:
            # Redis went away mid-step: hand the job back rather than let arq record it as failed; the
            # claim is reclaimed by this worker at once, or by another when its lease lapses
            log.warning("job %s: Redis error (%s: %s); handing it back", job.job_id, type(e).__name__, e)
            raise Retry(defer=1) from e
        if handled.retry_after_s is not None:
            raise Retry(defer=handled.retry_after_s)
        return handled.note or "ok"

    def create_worker(self, *, burst: bool = False) -> Worker:
        return Worker(
            functions=[func(self.step, name=STEP_FUNCTION, max_tries=100_000, keep_result=0)],
            queue_name=self.queue_name,
            redis_pool=self.queue.pool,
            burst=burst,
            max_jobs=self.concurrency,
            job_timeout=self.job_timeout_s,
            keep_result=0,
            poll_delay=self.poll_delay_s,
            queue_read_limit=max(1000, 5 * self.concurrency),
            handle_signals=False,
            job_serializer=self.queue.pool.job_serializer,
            job_deserializer=self.queue.pool.job_deserializer,
            log_results=False,
        )

    async def start(self, *, burst: bool = False, install_signals: bool = False) -> None:
        """Process jobs until stopped (or, with ``burst``, until the queue is empty). A Redis outage does
        not end the worker: it reconnects with backoff (arq's own loop would exit)."""
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        delay = 0.2
        while not self._stopping.is_set():
            worker = self._worker = self.create_worker(burst=burst)
            main = asyncio.ensure_future(worker.main())
            stop = asyncio.ensure_future(self._stopping.wait())
            try:
                done, _ = await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
                if main in done:
                    main.result()
                    if burst:
                        return
                    delay = 0.2
                    continue
                await self._drain(worker, main)
                return
            except (RedisError, ConnectionError, OSError) as e:
                # any Redis failure (lost connection, READONLY after a failover, OOM, MISCONF): back off and
                # try again rather than take the worker down
                log.warning("lost Redis (%s: %s); reconnecting in %.1fs", type(e).__name__, e, delay)
                await self._abandon(worker, main)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                stop.cancel()

    def stop(self) -> None:
        """Stop picking jobs; in-flight steps get ``shutdown_wait_s`` to finish, then are handed back."""
        self.engine.draining = True
        if not self._stopping.is_set():
            log.info("stopping: finishing in-flight steps (up to %.0fs), then handing back the rest",
                     self.shutdown_wait_s)
            self._stopping.set()

    async def _drain(self, worker: Worker, main: asyncio.Future[Any]) -> None:
        worker.allow_pick_jobs = False
        deadline = asyncio.get_running_loop().time() + self.shutdown_wait_s
        while any(not t.done() for t in worker.tasks.values()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for t in worker.tasks.values():
            if not t.done():
                t.cancel()  # arq puts a cancelled job back in the queue; the engine releases its claim
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        main.cancel()
        await asyncio.gather(main, return_exceptions=True)

    async def _abandon(self, worker: Worker, main: asyncio.Future[Any]) -> None:
        for t in worker.tasks.values():
            t.cancel()
        main.cancel()
        await asyncio.gather(main, *worker.tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        await self.queue.close()
