"""ArqAdapter: the distributed runtime's public door (seed API). Workers run one node step per arq job
through the shared engine; clients start, resume, cancel and read runs."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arq import Retry
from arq.worker import Worker, func
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..blueprint import Blueprint
from ..engine import Engine, EngineSettings, Handled, Recovery, StepOutcome, now_ms
from ..jobs import Job, Picked
from ..registry import NodeRegistry
from ..store import OUTBOX, RUN
from ..view import RunView
from . import keys
from .coordination import RedisCoordinationStore
from .definitions import Definitions
from .queue import STEP_FUNCTION, ArqQueue, WakingWorker, arq_pool_for, deserialize
from .redis_store import RedisStore
from .views import RunReader
from .workers import WorkerRegistry, worker_fields

log = logging.getLogger("flowcraft.worker")

DEFAULT_QUEUE = "flowcraft-queue"
# Test-only fault injection (like a failpoint): FLOWCRAFT_FAILPOINT=after-commit:<node_id> makes this worker
# process exit right after committing that node's step and before queueing what follows.
_FAILPOINT = os.environ.get("FLOWCRAFT_FAILPOINT", "")
# arq's own job timeout, kept out of the way (CONTRACT §6.1): an attempt ends at its own limit, enforced by
# the engine. arq's lock on a running job is one lease long and renewed by the heartbeat (create_worker).
ARQ_JOB_TIMEOUT_S = 365 * 86400


FAILED_RESULT = "failed:"
_ARQ_DONE = "%6.2fs ← %s ● %s"


class _StepResultLine(logging.Filter):
    """arq logs every job whose function returned as a success (``●``). A step whose node attempt failed
    does return (the engine recorded the failure and queued the retry), so its line gets ``✗`` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.msg == _ARQ_DONE and isinstance(args, tuple) and len(args) == 3 \
                and str(args[2])[1:].startswith(FAILED_RESULT):  # repr() of the result: a quote first
            record.msg = "%6.2fs ← %s ✗ %s"
        return True


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
        lease_s: float = 15,
        ttl_s: int = 86400,
        running_ttl_s: int = 7 * 86400,
        version_grace_s: float = 300,
        poll_delay_s: float = 0.02,
        idle_s: float = 1.0,
        shutdown_wait_s: float = 10,
        worker_id: str | None = None,
        inline_steps: bool = True,
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
        self.lease_s = lease_s
        self.poll_delay_s = poll_delay_s  # burst mode's poll; a long-running worker is woken instead
        self.idle_s = idle_s  # the longest an idle worker waits without looking at the queue
        self.shutdown_wait_s = shutdown_wait_s
        self.inline_steps = inline_steps  # a worker runs the successor a step's commit claims for it (create_worker)
        # hostname:pid alone is not unique (two adapters in one process, containers that are all PID 1)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.queue = ArqQueue(arq_pool_for(connection, queue_name), queue_name)
        self.store = RedisStore(connection, running_ttl_s=running_ttl_s, queue_name=queue_name, queue=self.queue)
        self.workers = WorkerRegistry(connection, queue_name, self.worker_id, lease_s)
        self.definitions = Definitions(connection)
        self.reader = RunReader(connection, queue_name, blueprints=self.blueprints, store=self.store,
                                workers=self.workers)
        self.engine = Engine(self.store, self.blueprints, self.registry, worker_id=self.worker_id,
                             settings=EngineSettings(ttl_s=ttl_s, running_ttl_s=running_ttl_s,
                                                     version_grace_s=version_grace_s,
                                                     attempt_timeout_s=job_timeout_s or None))
        self.engine.is_held_remote = self.workers.is_held
        self.engine.load_definition = self.definitions.load  # a run of a blueprint not loaded here
        self.engine.log_failures = True
        self._worker: Worker | None = None
        self._stopping = asyncio.Event()
        self.in_flight: dict[str, Job] = {}  # arq job id -> the step this worker runs now
        self.jobs_taken = 0  # queue jobs this worker's commits took (Engine.pick_ms) instead of arq's pickup
        self.started_at = now_ms()

    # ---- client side

    async def start_run(self, blueprint_id: str, run_input: Any = None, *, run_id: str | None = None) -> str:
        run_id, scheduled = await self.engine.start_run(blueprint_id, {} if run_input is None else run_input,
                                                        run_id=run_id)
        await self.flush(scheduled)
        return run_id

    async def resume(self, run_id: str, node_id: str | None = None, *, output: Any = None,
                     action: str | None = None) -> None:
        await self.flush(await self.engine.resume(run_id, node_id, output=output, action=action))

    async def retry(self, run_id: str) -> None:
        """A failed run goes on from where it failed, on the workers (CONTRACT §10)."""
        await self.flush(await self.engine.retry(run_id))

    async def cancel(self, run_id: str) -> bool:
        changed, scheduled = await self.engine.cancel(run_id)
        await self.flush(scheduled)  # e.g. a cancelled child run tells its parent
        return changed

    async def inspect(self, run_id: str, *, timeline: bool = True) -> RunView:
        return await self.reader.inspect(run_id, timeline=timeline)

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
            expected, outbox_ids, lost = await self.engine.expected_jobs(run_id)
            alive = await self.queue.state_of([job.job_id for job in expected])
            planned = [job for job in expected if job.job_id not in alive] + [job for job, _, _ in lost]
            if dry_run:
                return ReconcileOutcome(planned, [])
            enqueued = await self.queue.enqueue([job for job in expected if job.job_id not in alive])
            for job, worker, held_as in lost:  # claimed by a worker that no longer holds them
                enqueued += await self._recover_step(held_as, job, worker) or []
            # only the entries read above: one written since then belongs to a step that queues it itself
            await self.store.ack_jobs(run_id, outbox_ids)
            if enqueued:
                log.info("reconciled run %s: queued %s", run_id, ", ".join(enqueued))
            return ReconcileOutcome(planned, enqueued)
        finally:
            if not dry_run:
                await self.coordination_store.release(lock, token)  # only if still ours

    async def flush(self, scheduled: list[tuple[str, Job]]) -> list[str]:
        """Queue jobs a committed step decided, then clear them from their run's outbox. A store that queues
        them in the commit itself (``RedisStore``) leaves nothing to do here."""
        if not scheduled:
            return []
        if self.store.enqueues:
            return [job.job_id for _, job in scheduled]
        added = await self.queue.enqueue(job for _, job in scheduled)
        by_owner: dict[str, list[str]] = {}
        for owner, job in scheduled:
            by_owner.setdefault(owner, []).append(job.job_id)
        for owner, ids in by_owner.items():
            await self.store.ack_jobs(owner, ids)
        return added

    # ---- recovery (CONTRACT §6.1)

    async def recover_dead_workers(self, dead: list[str] | None = None) -> int:
        """Recover every step listed by a worker of this queue that stopped heartbeating. Any worker and the
        reconciler call this; steps are recovered in transactions, so two at once recover each step once.
        Returns the number of steps recovered or queued again."""
        if dead is None:
            dead = await self.workers.dead_workers()
        count = 0
        for worker_id in dead:
            if worker_id == self.worker_id:
                continue  # this worker was cut off past its lease and is back: its steps are its own
            lock, token = f"recover:{worker_id}", f"{self.worker_id}:{secrets.token_hex(4)}"
            if not await self.coordination_store.set_if_not_exist(lock, token, max(5, int(self.lease_s * 2))):
                continue  # another worker is on it
            try:
                steps = await self.workers.steps_of(worker_id)
                done: list[str] = []
                for job_id, job in steps.items():
                    if job is None:
                        await self.queue.discard([job_id])
                        done.append(job_id)
                        continue
                    try:
                        queued = await self._recover_step(job_id, job, worker_id)
                    except Exception as e:  # one run that cannot be recovered must not block the others
                        log.warning("could not recover %s of worker %s (%s: %s); leaving it listed", job_id,
                                    worker_id, type(e).__name__, e)
                        continue
                    if queued is not None:  # None: this worker cannot judge it; one that can will
                        count += len(queued)
                        done.append(job_id)
                await self.workers.forget(worker_id, done)
                if done:
                    log.warning("worker %s stopped heartbeating: recovered %d of its %d steps", worker_id, len(done),
                                len(steps))
            finally:
                await self.coordination_store.release(lock, token)
        return count

    async def _recover_step(self, job_id: str, job: Job, worker_id: str, *, lost: bool = True) -> list[str] | None:
        """One step a worker no longer holds: record the lost attempt and queue it anew (a new job id), or
        queue it again as it was if it never got claimed. Returns the job ids really queued, or None when
        the step stays listed: this worker cannot judge it (its run's blueprint version is not loaded here, or
        it moved on as it looked), or a live worker holds it (one back from a pause)."""
        outcome, scheduled = await self.engine.recover(job, worker_id, lost=lost, held_as=job_id)
        if outcome in (Recovery.UNKNOWN, Recovery.HELD):
            return None
        if outcome == Recovery.NOTHING:
            # the step moved on (done, or taken over by the worker arq handed the job to): its arq job, if
            # any is left, is dropped as stale when it runs, and arq's lock on it lapses with the lease
            if await self.redis.hlen(keys.kind_key(OUTBOX, job.run_id)):
                # a recovery that died between its commit and queueing left its decision in the outbox
                return (await self.reconcile(job.run_id)).enqueued
            return []
        await self.queue.discard([job_id])  # the old job, locked in arq by the worker that held it
        if outcome == Recovery.REQUEUE:
            return await self.queue.enqueue([job])
        for _, new in scheduled:
            log.info("recovered %s (worker %s) as job %s", job_id, worker_id, new.job_id)
        return await self.flush(scheduled)

    async def _heartbeat(self) -> None:
        """Every lease/3: renew this worker's lease, and recover this worker's own steps that are listed but no
        longer running here (a step that died with a Redis error). Every second or so in between: look for
        workers whose lease lapsed and recover their steps, so that recovery takes about ``lease_s`` after
        the dead worker's last heartbeat, not up to one more heartbeat interval."""
        beat_every = self.lease_s / 3
        tick = min(1.0, beat_every)
        next_beat = 0.0
        while True:
            try:
                dead: list[str] = []
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + beat_every
                    await self._beat()
                else:
                    dead = await self.workers.dead_workers()
                if dead:
                    await self.recover_dead_workers(dead)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis away: the lease lapses if it stays away; keep trying
                log.warning("heartbeat failed (%s: %s)", type(e).__name__, e)
            await asyncio.sleep(tick)

    async def _beat(self) -> None:
        late = self.workers.last_beat is not None and time.monotonic() - self.workers.last_beat > self.lease_s
        _, dead, mine = await self.workers.beat(self._fields())
        if self._worker is not None:  # arq's lock on every job this worker runs lives one more lease
            running = {jid for jid, t in self._worker.tasks.items() if not t.done()}
            await self.queue.renew(running | set(self.in_flight), self.workers.lease_ms)  # and jobs it took itself
        if late:
            log.warning("this worker sent no heartbeat for more than its lease (%gs): the event loop was "
                        "blocked or the process paused; its steps may have been recovered elsewhere, "
                        "and their results here will be dropped", self.lease_s)
        if dead:
            await self.recover_dead_workers(dead)
        if any(j not in self.in_flight for j in mine):
            for job_id, job in (await self.workers.steps_of(self.worker_id)).items():
                if job_id in self.in_flight:
                    continue
                try:
                    if job is not None and await self._recover_step(job_id, job, self.worker_id, lost=False) is None:
                        continue
                except Exception as e:  # one broken run must not stop the heartbeat's other work
                    log.warning("could not recover %s (%s: %s)", job_id, type(e).__name__, e)
                    continue
                if job_id not in self.in_flight:  # it may have been delivered here again meanwhile
                    await self.workers.release([job_id])

    def _served(self) -> dict[str, str]:
        """The blueprints (id -> version) this worker runs."""
        return {bp.id: bp.version for bp in self.blueprints.values()}

    def _fields(self) -> dict[str, Any]:
        return worker_fields(self.queue_name, self._served(), self.concurrency, self.started_at, len(self.in_flight))

    async def _check_fleet(self) -> None:
        """Warn when the live workers of this queue serve other blueprint sets: a job of a blueprint only some
        of them have waits for one of those."""
        mine = self._served()
        for w in await self.workers.workers():
            if w.alive and w.worker_id != self.worker_id and w.blueprints != mine:
                theirs = ", ".join(f"{k}@{v}" for k, v in sorted(w.blueprints.items())) or "none"
                ours = ", ".join(f"{k}@{v}" for k, v in sorted(mine.items())) or "none"
                log.warning("worker %s on queue %r serves other blueprints (%s) than this one (%s): a job "
                            "waits for a worker that has its blueprint version; use one queue per project",
                            w.worker_id, self.queue_name, theirs, ours)

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
        job_id = str(ctx.get("job_id") or job.job_id)
        # a second delivery of a job this worker is running (arq's lock lapsed while the event loop was blocked)
        # must not unlist it: the first delivery owns the listing
        owner = job_id not in self.in_flight
        if owner:
            self.in_flight[job_id] = job
        handled: Handled | None = None
        ran = job  # the step handled last: this job's, or one its chain claimed inline
        left_queue = False  # the step's commit took this job out of the queue (its chain goes on under it)
        unknown = False  # a Redis error left it unknown whether the step's commit applied
        try:
            if _FAILPOINT == f"before-hold:{job.node_id}":
                os._exit(137)  # fault-injection: die after arq handed the job over, before it is listed
            # the claim lists the step under this worker in its own transaction, and the commit unlists it;
            # until the claim, arq's lease-long lock on the job covers a crash
            # a first delivery may run its node before it claims it (Engine.defer_claims)
            handled = await self.engine.handle(job, first=ctx.get("job_try") == 1)
            left_queue = handled.left_queue
            handled, ran = await self._go_on(job_id, job, handled)
        except (RedisError, OSError) as e:
            unknown = handled is None  # did its commit apply? (its reply may be what was lost)
            if left_queue:
                # its own step is done and the job out of the queue: handing it back would queue a job with no
                # payload. The step of its chain that met the error is listed under this worker, which
                # recovers it (at its next heartbeat, or another worker a lease after this one dies)
                log.warning("job %s: Redis error (%s: %s) in the chain of steps it ran; left to recovery",
                            job.job_id, type(e).__name__, e)
                return "left to recovery"
            # Redis went away mid-step: hand the job back rather than let arq record it as failed; the
            # claim is reclaimed by this worker at once, or by another when its lease lapses
            log.warning("job %s: Redis error (%s: %s); handing it back", job.job_id, type(e).__name__, e)
            raise Retry(defer=1) from e
        finally:
            if owner:
                await self._done_with(job_id, job.job_id, handled, unknown)
        picked = handled.picked
        while picked is not None:  # the last commit took the queue's next job for this worker: run it here
            picked = await self._run_picked(picked)
        if handled.retry_after_s is not None:
            defer = handled.retry_after_s
            if handled.outcome == StepOutcome.VERSION_MISMATCH and await self._served_elsewhere(job):
                defer = 0.2  # a live worker has the right version: let it have the job soon
            raise Retry(defer=defer)
        if handled.failed is not None:
            # arq saw the step return normally; this result makes its log line say the attempt failed
            return f"{FAILED_RESULT} attempt {ran.attempt} of node {ran.node_id}: {handled.failed}"
        return handled.describe()

    async def _done_with(self, job_id: str, listed_as: str, handled: Handled | None, unknown: bool = False) -> None:
        """Queue job ``job_id`` is done here: unlist its step (``listed_as``) unless its commit did, and only
        then let it leave ``in_flight``: the heartbeat recovers listed steps that are not in flight, and this
        one is still finishing. ``unknown``: a Redis error hid whether its commit applied; if it did, the
        entry now lists the successor it claimed for this slot, so it stays for the heartbeat to judge
        (recovered if claimed, dropped if not)."""
        if not unknown and (handled is None or handled.listed):  # still listed: no commit unlisted it
            try:
                await asyncio.shield(self.workers.release([listed_as]))
            except (RedisError, OSError):
                pass  # still listed: this worker's heartbeat recovers it once Redis answers
        self.in_flight.pop(job_id, None)

    async def _go_on(self, job_id: str, job: Job, handled: Handled) -> tuple[Handled, Job]:
        """After queue job ``job_id``'s own step (``handled``), whether arq handed it over or a commit took
        it: run the chain its commits claimed for this worker, queue what the last step decided, and finish a
        redelivered step's lost queueing. Returns the last step's outcome and job."""
        if _FAILPOINT and _FAILPOINT == f"after-commit:{job.node_id}":
            os._exit(137)  # fault-injection for the crash tests: die right after a commit
        handled, ran = await self._run_inline(job_id, handled, job)
        await self.flush(handled.scheduled)
        if handled.outcome in (StepOutcome.STALE, StepOutcome.RUN_FINISHED) and \
                await self.redis.hlen(keys.kind_key(OUTBOX, job.run_id)):
            # a redelivered step that already happened: what it decided may have been lost between its
            # commit and the queueing (the worker died there), so finish that part now
            await self.reconcile(job.run_id)
        return handled, ran

    async def _run_inline(self, job_id: str, handled: Handled, ran: Job) -> tuple[Handled, Job]:
        """Run the successors commits claimed for this worker, one after another, under queue job
        ``job_id``'s entry in this worker's list of steps (so the heartbeat keeps each held, and recovery
        finds it). Returns the last step's outcome and job."""
        while handled.inline is not None:
            step = handled.inline
            await self.flush(handled.scheduled)
            self.in_flight[job_id] = ran = step.job
            handled = await self.engine.handle(step.job, step)
            if _FAILPOINT and _FAILPOINT == f"after-commit:{step.job.node_id}":
                os._exit(137)
        return handled, ran

    async def _run_picked(self, picked: Picked) -> Picked | None:
        """Run a queue job a commit took for this worker (``Engine.pick_ms``), as arq would have: its lock
        (arq's in-progress key) is renewed by the heartbeat while it runs, and arq hands it to another worker
        if this one dies. Then finish it in the queue. Returns the next job taken, if any."""
        job_id, payload, tries, fresh = picked
        try:
            data = deserialize(payload)
            if not isinstance(data, dict) or data.get("f") != STEP_FUNCTION or len(data.get("a") or ()) != 1:
                raise ValueError("not a flowcraft step")
            job = Job.from_dict(data["a"][0])
        except ValueError as e:
            log.error("job %s rejected, not run: %s", job_id, e)
            await self.queue.finish(job_id)
            return None
        if job_id in self.in_flight:
            return None  # this worker runs it already (it cannot take the same lock twice; defensive)
        self.store.seed(job.run_id, data.get("seed"))  # (a start job's: what its claim reads, ArqQueue.job_record)
        # the node's record and input as the commit that took the job found them: read anew, in that commit
        reread = self.store.reread(job.run_id, data.get("reread"), fresh)
        self.in_flight[job_id] = job
        self.engine.taken_jobs.add(job_id)
        handled: Handled | None = None
        unknown = False
        try:
            handled = await self.engine.handle(job, first=tries == 1, reread=reread)
            handled, _ = await self._go_on(job_id, job, handled)
        except (RedisError, OSError) as e:
            # Redis went away mid-step: leave the job locked; arq hands it on when the lock lapses
            log.warning("job %s: Redis error (%s: %s); left for the queue", job_id, type(e).__name__, e)
            unknown = handled is None
            return None
        finally:
            await self._done_with(job_id, job_id, handled, unknown)
            unfinished = job_id in self.engine.taken_jobs  # no commit finished it (Step.left_queue)
            self.engine.taken_jobs.discard(job_id)
        if handled.retry_after_s is not None:
            await self.queue.defer(job_id, handled.retry_after_s)
        elif unfinished:  # a duplicate, a stale step: nothing committed
            await self.queue.finish(job_id)
        self.jobs_taken += 1
        return handled.picked

    async def _served_elsewhere(self, job: Job) -> bool:
        meta = await self.store.read(job.run_id, RUN, ["blueprint_id", "blueprint_version"])
        return any(w.alive and w.blueprints.get(meta[0]) == meta[1] for w in await self.workers.workers()
                   if w.worker_id != self.worker_id)

    def create_worker(self, *, burst: bool = False) -> Worker:
        arq_log = logging.getLogger("arq.worker")
        if not any(isinstance(f, _StepResultLine) for f in arq_log.filters):
            arq_log.addFilter(_StepResultLine())
        worker = WakingWorker(
            functions=[func(self.step, name=STEP_FUNCTION, max_tries=100_000, keep_result=0)],
            queue_name=self.queue_name,
            redis_pool=self.queue.pool,
            burst=burst,
            max_jobs=self.concurrency,
            job_timeout=ARQ_JOB_TIMEOUT_S,
            keep_result=0,
            # a long-running worker blocks on wake-ups between looks at the queue (WakingWorker), so arq's
            # own pause between polls would only add latency; burst mode polls as arq does
            poll_delay=self.poll_delay_s if burst else 0,
            idle_s=self.idle_s,
            queue_read_limit=max(1000, 5 * self.concurrency),
            handle_signals=False,
            job_serializer=self.queue.pool.job_serializer,
            job_deserializer=self.queue.pool.job_deserializer,
            log_results=True,  # the step's outcome ('ok', 'stale', 'failed: ...'), never user data
        )
        # a step's commit claims one successor it makes ready for this worker, which runs it next in the same
        # queue job (CONTRACT §6): a chain then goes through the queue once, not once per node
        self.engine.inline_steps = self.engine.take_queued = self.inline_steps
        # ... and a commit that claims none takes the queue's next ready job for this worker, locked one lease
        self.engine.pick_ms = int(self.lease_s * 1000) if self.inline_steps else 0
        self.engine.defer_claims = self.inline_steps
        # ... and a step runs the quick steps of a chain after it ahead of its commit, committing them with it
        self.engine.fuse_steps = self.inline_steps
        # arq locks a running job for its job timeout + 10 s; here the lock lasts one lease and the heartbeat
        # renews it (``_beat``), so a dead worker's job is handed to another worker by arq itself a lease
        # after its last heartbeat, even in the moments it is not in the worker's list of steps
        worker.in_progress_timeout_s = self.lease_s
        return worker

    async def start(self, *, burst: bool = False, install_signals: bool = False) -> None:
        """Process jobs until stopped (or, with ``burst``, until the queue is empty). A Redis outage does
        not end the worker: it reconnects with backoff (arq's own loop would exit)."""
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        delay = 0.2
        heartbeat: asyncio.Task[None] | None = None
        try:
            await self.workers.beat(self._fields())  # registered before the first job is taken
            await self._check_fleet()
        except (RedisError, OSError) as e:
            log.warning("could not register this worker yet (%s: %s)", type(e).__name__, e)
        heartbeat = asyncio.ensure_future(self._heartbeat())
        # a step runs nodes ahead of its commit only while this worker's lease is known to hold (engine.ahead)
        self.engine.lease_held = self.workers.held_throughout
        try:
            await self._process(burst, delay)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            try:
                await self.workers.unregister()
            except (RedisError, OSError):
                pass  # its key expires after lease_s anyway

    async def _process(self, burst: bool, delay: float) -> None:
        while not self._stopping.is_set():
            worker = self._worker = self.create_worker(burst=burst)
            main = asyncio.ensure_future(worker.main())
            stop = asyncio.ensure_future(self._stopping.wait())
            try:
                done, _ = await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
                if main in done:
                    main.result()
                    # arq's burst ends once it found the queue empty and then its running jobs done; a step
                    # that ran inline meanwhile (out of the queue) may have queued more since, a retry for
                    # later say: the burst goes on until the queue is empty when nothing runs
                    if burst and not await self.redis.zcard(self.queue.queue_name):
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
        if not self._stopping.is_set():
            log.info("stopping: finishing in-flight steps (up to %.0fs), then handing back the rest",
                     self.shutdown_wait_s)
            self._stopping.set()
            self.engine.pick_ms = 0  # take no more jobs in commits either,
            self.engine.inline_steps = False  # nor claim steps to run next: what is left goes to the queue
            self.engine.take_queued = False

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
        await self.store.close()
        await self.queue.close()
