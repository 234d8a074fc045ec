"""Found by a hostile review of the one-call commit and inline steps: a refusal decided on a stale cache, and an
inline step stranded by a Redis error before it started. Each failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.harness import make_adapter

WAIT = """
id: w1
nodes:
  - {id: a, uses: tag}
  - {id: w, uses: wait}
  - {id: b, uses: tag}
edges:
  - {source: a, target: w}
  - {source: w, target: b}
"""
FLAKY = """
id: r1
nodes:
  - {id: a, uses: tag}
  - {id: b, uses: flaky, config: {maxRetries: 1}}
edges:
  - {source: a, target: b}
"""
CHAIN = """
id: ch
nodes:
  - {id: a, uses: tag}
  - {id: b, uses: tag}
edges:
  - {source: a, target: b}
"""


def _tag(ctx):
    return ctx.node_id


async def _close(*adapters) -> None:
    for a in adapters:
        await a.close()
        await a.redis.aclose()


def test_a_client_that_started_the_run_can_resume_it(redis_url):
    """The client's cache still says the wait node has not fired; resume must not raise StateConflict on it
    (the exception path of a transaction skips the commit's read validation)."""

    async def go():
        c = make_adapter(Redis.from_url(redis_url), [WAIT], {"tag": _tag}, queue_name="rr-1")
        w = make_adapter(Redis.from_url(redis_url), [WAIT], {"tag": _tag}, queue_name="rr-1")
        try:
            run_id = await c.start_run("w1", {})
            await w.start(burst=True)
            assert (await c.inspect(run_id)).status == "awaiting"
            await c.resume(run_id, "w", output={"ok": 1})
            await w.start(burst=True)
            return (await c.inspect(run_id)).status
        finally:
            await _close(c, w)

    assert asyncio.run(go()) == "completed"


def test_a_client_that_started_the_run_can_retry_it(redis_url):
    state = {"fail": True}

    def flaky(ctx):
        if state["fail"]:
            raise RuntimeError("boom")
        return "ok"

    async def go():
        nodes = {"tag": _tag, "flaky": flaky}
        c = make_adapter(Redis.from_url(redis_url), [FLAKY], nodes, queue_name="rr-2")
        w = make_adapter(Redis.from_url(redis_url), [FLAKY], nodes, queue_name="rr-2")
        try:
            run_id = await c.start_run("r1", {})
            await w.start(burst=True)
            assert (await c.inspect(run_id)).status == "failed"
            state["fail"] = False
            await c.retry(run_id)  # raised StateConflict: "run is running; only a failed run can be retried"
            await w.start(burst=True)
            return (await c.inspect(run_id)).status
        finally:
            await _close(c, w)

    assert asyncio.run(go()) == "completed"


def test_a_redis_error_before_an_inline_step_starts_does_not_strand_it(redis_url):
    """The inline step's claim token is added to active_tokens by its predecessor's commit; a Redis error in
    Engine._handle before Step.run (preload of a >64 KB input, peek) leaves it there, so the worker's own
    heartbeat finds the step 'held', recovers nothing, and unlists it: b stays running forever."""
    calls: list[str] = []

    def tag(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    async def go():
        w = make_adapter(Redis.from_url(redis_url), [CHAIN], {"tag": tag}, queue_name="rr-3")
        try:
            w.create_worker()  # inline steps on, as a worker process has them
            run_id = await w.start_run("ch", {})
            first = (await w.engine.expected_jobs(run_id))[0][0]
            real = w.store.preload

            async def flaky(run, wanted, anew=None):
                if wanted.get("nodes") == ["b"]:
                    raise RedisConnectionError("Redis went away")
                return await real(run, wanted, anew)

            w.store.preload = flaky
            await w.workers.beat(w._fields())
            # a's commit took a's job out of the queue (its slot went on with b): nothing to hand back to arq
            assert await w.step({"job_id": first.job_id}, first.to_dict()) == "left to recovery"
            assert await w.redis.zscore("rr-3", first.job_id) is None
            w.store.preload = real
            await w._beat()  # the worker's own heartbeat recovers its listed steps that are not in flight
            await w.start(burst=True)
            return (await w.inspect(run_id)).status
        finally:
            await _close(w)

    assert asyncio.run(go()) == "completed"
    assert calls.count("b") == 1


# ---- found by the review of "a job leaves the queue when its step hands its slot on" (each failed before its fix)

SLOW = {"id": "slow", "nodes": [{"id": "x", "uses": "slow"}], "edges": []}
FAST = {"id": "fast", "nodes": [{"id": "y", "uses": "fast"}], "edges": []}
CHAIN3 = {"id": "chain3", "nodes": [{"id": f"n{i}", "uses": "tag"} for i in range(3)],
          "edges": [{"source": "n0", "target": "n1"}, {"source": "n1", "target": "n2"}]}


def test_a_free_slot_is_not_starved_by_a_running_job_at_the_queue_head(redis_url):
    """Two slots, one busy with a long node whose job sits at the head of the queue (arq keeps a running job
    queued until it ends). A job queued after it runs on the free slot while the long one still runs: a look
    at the queue that reads only as many ids as there are free slots found only the running one."""
    order: list[str] = []
    release = asyncio.Event()

    async def slow(ctx):
        order.append("slow start")
        await asyncio.wait_for(release.wait(), 30)
        order.append("slow end")

    def fast(ctx):
        order.append("fast")
        release.set()

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [SLOW, FAST], {"slow": slow, "fast": fast},
                         queue_name="rv-starve", concurrency=2, idle_s=0.2)
        task = asyncio.ensure_future(a.start())
        try:
            await a.start_run("slow", {})
            while "slow start" not in order:
                await asyncio.sleep(0.02)
            run_id = await a.start_run("fast", {})
            while (await a.status(run_id)) is None:
                await asyncio.sleep(0.02)
        finally:
            a.stop()
            await task
            await a.close()
            await a.redis.aclose()

    asyncio.run(go())
    assert order == ["slow start", "fast", "slow end"]  # the slow node ends only once fast has run


def test_a_lost_reply_to_a_commit_that_took_its_job_out_of_the_queue(redis_url, caplog):
    """n0's commit applies (its job out of the queue, n1 claimed for the slot under the job's entry) but its
    reply is lost. The worker hands the job back to arq (Retry): arq's ZINCRBY queued its id again with no
    job behind it ("job expired"), and the worker unlisted the entry, which listed n1 by then: n1 stayed
    running until a reconciler came. Now arq moves the job only if it is still queued, the entry stays, and
    the worker's heartbeat recovers n1."""
    state: dict[str, bool | None] = {"arm": False}

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [CHAIN3], {"tag": lambda ctx: ctx.node_id},
                         queue_name="rv-ghost", concurrency=1)
        # the chain one commit a node (n0's hands the slot on to n1), not one group (engine.ahead)
        create = a.create_worker

        def create_worker(**kw: Any) -> Any:
            worker = create(**kw)
            a.engine.fuse_steps = False
            return worker

        a.create_worker = create_worker
        real_unqueue, real_apply = a.queue.unqueue_op, a.store._apply

        def unqueue_op(program, job_id):
            if state["arm"] is False:
                state["arm"] = True
            return real_unqueue(program, job_id)

        async def apply(*args, **kw):
            reply = await real_apply(*args, **kw)
            if state["arm"] is True:
                state["arm"] = None  # once: the commit applied, its reply is lost
                raise RedisConnectionError("reply lost")
            return reply

        a.queue.unqueue_op, a.store._apply = unqueue_op, apply
        try:
            run_id = await a.start_run("chain3", {})
            await asyncio.wait_for(a.start(burst=True), 20)
            failed = a._worker.jobs_failed
            queued = await a.redis.zrange("rv-ghost", 0, -1)
            await a._beat()  # the worker's heartbeat: its listed steps that are not in flight
            await asyncio.wait_for(a.start(burst=True), 20)
            return failed, queued, (await a.inspect(run_id)).status
        finally:
            await a.close()
            await a.redis.aclose()

    failed, queued, status = asyncio.run(go())
    assert state["arm"] is None  # the fault was injected
    assert failed == 0 and queued == [] and not [r for r in caplog.records if "expired" in r.getMessage()]
    assert status == "completed"


def _two(version: str) -> dict:
    return {"id": "two", "metadata": {"version": version},
            "nodes": [{"id": "s", "uses": "tag"}, {"id": "p", "uses": "tag"}, {"id": "q", "uses": "tag"}],
            "edges": [{"source": "s", "target": "p"}, {"source": "s", "target": "q"}]}


def test_a_job_a_worker_of_another_version_holds_is_left_to_it_and_runs_after_its_hand_back(redis_url):
    """Rolling deploy: worker B (old version) has q's job in progress. A's commit does not claim q from under
    it (the job is locked: B may be running it unclaimed); B's version gate hands the job back (Retry), and it
    stays queued for a worker with the run's version: A runs it. (Before deferred claims, A's commit claimed q
    and dropped its job, and arq's ZINCRBY then queued the id again with no job behind it: finish_job moves an
    id only if it is still queued.)"""
    from arq import Retry

    from flowcraft_cli.jobs import Job

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [_two("new")], {"tag": lambda ctx: ctx.node_id},
                         queue_name="rv-ver")
        b = make_adapter(Redis.from_url(redis_url), [_two("old")], {"tag": lambda ctx: ctx.node_id},
                         queue_name="rv-ver")
        try:
            a.create_worker()
            await a.workers.beat(a._fields())
            run_id, scheduled = await a.engine.start_run("two", {})
            s = await a.engine.handle(scheduled[0][1])
            q = Job(run_id, "q", 1)
            await b.queue.pool.psetex(f"arq:in-progress:{q.job_id}", 15000, b"1")  # B's arq started q
            p = await a.engine.handle(s.inline.job, s.inline)  # A leaves q to B
            assert p.inline is None
            wb = b.create_worker()
            try:
                await b.step({"job_id": q.job_id}, q.to_dict())
                retry = None
            except Retry as e:
                retry = e
            assert retry is not None and retry.defer_score
            # what arq's run_job does next with a Retry: finish=False, incr_score = the deferral
            await wb.finish_job(q.job_id, False, None, 0, False, retry.defer_score + 5, None)
            score, locked = await a.redis.zscore("rv-ver", q.job_id), await a.redis.exists(f"arq:in-progress:{q.job_id}")
            done = await a.engine.handle(q)  # a worker of the run's version takes it
            return score, locked, done, (await a.inspect(run_id)).status
        finally:
            for ad in (a, b):
                await ad.close()
                await ad.redis.aclose()

    score, locked, done, status = asyncio.run(go())
    assert score is not None and locked == 0  # queued for later, unlocked
    assert done.outcome.value == "ok" and status == "completed"
