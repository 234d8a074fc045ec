"""Distributed runtime behaviour that needs a hand on the queue: duplicate delivery, corrupt jobs, the
version gate, a Redis outage."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from flowcraft_cli.distributed.adapter import ArqAdapter
from flowcraft_cli.distributed.queue import STEP_FUNCTION
from flowcraft_cli.jobs import Job
from tests.e2e import Project, wait_for
from tests.harness import make_adapter
from tests.redis_server import RedisServer

JOIN = """
id: join
nodes:
  - {id: a, uses: count}
  - {id: b, uses: count}
  - {id: c, uses: count}
edges:
  - {source: a, target: c}
  - {source: b, target: c}
"""


def _adapter(redis: Redis, docs, nodes, **kw) -> ArqAdapter:
    return make_adapter(redis, docs, nodes, **kw)


def test_duplicate_delivery_counts_once_and_join_waits(redis_url, redis_sync):
    calls: list[str] = []

    def count(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    async def go():
        redis = Redis.from_url(redis_url)
        adapter = _adapter(redis, [JOIN], {"count": count})
        run_id, scheduled = await adapter.engine.start_run("join", {})
        jobs = {job.node_id: job for _, job in scheduled}
        # run a's step twice (a redelivery): c must still wait for b
        for _ in range(2):
            handled = await adapter.engine.handle(jobs["a"])
            await adapter.flush(handled.scheduled)
        view = await adapter.inspect(run_id)
        assert view.status == "running"
        # b was decided at start (it sits in the outbox, never queued: its client died); c waits for it
        assert [n.status for n in view.nodes] == ["completed", "queued", "pending"]
        # a delivered once more through arq: the worker sees a step that already happened, and finishes what
        # such a crash can leave behind (the outbox: b), so the run completes; c still fires once
        await adapter.queue.pool.enqueue_job(STEP_FUNCTION, jobs["a"].to_dict(), _job_id="a-again",
                                             _queue_name=adapter.queue_name)
        await adapter.start(burst=True)
        # and b delivered again after everything finished changes nothing
        await adapter.queue.pool.enqueue_job(STEP_FUNCTION, jobs["b"].to_dict(), _job_id="b-again",
                                             _queue_name=adapter.queue_name)
        await adapter.start(burst=True)
        view = await adapter.inspect(run_id)
        await adapter.close()
        await redis.aclose()
        return view

    view = asyncio.run(go())
    assert view.status == "completed"
    assert calls.count("a") == 1 and calls.count("b") == 1 and calls.count("c") == 1
    assert view.context["_inputs.c"] == {"a": "a", "b": "b"}


def test_corrupt_jobs_are_rejected_without_running(redis_url, redis_sync):
    calls: list[str] = []

    async def go():
        redis = Redis.from_url(redis_url)
        adapter = _adapter(redis, [JOIN], {"count": lambda ctx: calls.append(ctx.node_id)})
        pool = adapter.queue.pool
        bad = [
            ["not", "an", "object"],
            {"run_id": "r", "node_id": "a"},  # missing seq
            {"run_id": "r", "node_id": "a", "seq": 1, "kind": "rm -rf", "attempt": 1},
            {"run_id": "r", "node_id": "a", "seq": 1, "extra": True},
            {"run_id": "no-such-run", "node_id": "a", "seq": 1},
        ]
        for i, payload in enumerate(bad):
            await pool.enqueue_job(STEP_FUNCTION, payload, _job_id=f"bad{i}", _queue_name=adapter.queue_name)
        await redis.set("arq:job:raw", b"\x80\x04not json")
        await redis.zadd(adapter.queue_name, {"raw": int(time.time() * 1000)})
        await adapter.start(burst=True)
        left = await redis.zcard(adapter.queue_name)
        await adapter.close()
        await redis.aclose()
        return left

    assert asyncio.run(go()) == 0
    assert calls == []


def test_version_gate_leaves_job_then_fails_run_naming_both_versions(redis_url, redis_sync):
    v1 = JOIN.replace("id: join", "id: join\nmetadata: {version: '1'}")
    v2 = JOIN.replace("id: join", "id: join\nmetadata: {version: '2'}")

    async def go():
        redis = Redis.from_url(redis_url)
        old = _adapter(redis, [v1], {"count": lambda ctx: ctx.node_id}, version_grace_s=1.0)
        new = _adapter(redis, [v2], {"count": lambda ctx: ctx.node_id}, version_grace_s=1.0)
        run_id = await old.start_run("join", {})
        await new.start(burst=True)  # only a worker with version 2: it leaves the jobs, then gives up
        view = await new.inspect(run_id)
        status = await new.status(run_id)
        await old.close()
        await new.close()
        await redis.aclose()
        return view, status

    view, status = asyncio.run(go())
    assert view.status == "failed"
    assert "version '1'" in view.reason and "version '2'" in view.reason
    assert status["status"] == "failed"


def test_matching_worker_takes_job_left_by_mismatched_one(redis_url, redis_sync):
    v1 = JOIN.replace("id: join", "id: join\nmetadata: {version: '1'}")
    v2 = JOIN.replace("id: join", "id: join\nmetadata: {version: '2'}")

    async def go():
        redis = Redis.from_url(redis_url)
        old = _adapter(redis, [v1], {"count": lambda ctx: ctx.node_id}, version_grace_s=30)
        new = _adapter(redis, [v2], {"count": lambda ctx: ctx.node_id}, version_grace_s=30)
        run_id = await old.start_run("join", {})
        # the v2 worker sees the jobs and leaves them (Retry); the v1 worker then runs the whole run
        job = Job(run_id, "a", 1)
        handled = await new.engine.handle(job)
        assert handled.retry_after_s is not None
        await old.start(burst=True)
        view = await old.inspect(run_id)
        await old.close()
        await new.close()
        await redis.aclose()
        return view

    assert asyncio.run(go()).status == "completed"


def test_worker_survives_a_redis_restart(tmp_path):
    server = RedisServer()
    try:
        project = Project(tmp_path, server.url)
        worker = project.start_worker()
        server.stop()
        wait_for(lambda: "lost Redis" in project.worker_log(0), 10, "the worker to notice the outage")
        server.start()
        assert worker.poll() is None
        wait_for(lambda: "lost Redis" in project.worker_log(0), 10, "the worker to notice the outage")
        result = project.cli_json("enqueue", "routed", "--wait", "--timeout", "60")
        assert result["status"] == "completed"
        assert worker.poll() is None
        project.stop_all()
        assert worker.returncode == 0
    finally:
        server.close()



def test_version_grace_restarts_after_a_matching_worker_runs_a_step(redis_url, redis_sync):
    v1 = JOIN.replace("id: join", "id: join\nmetadata: {version: '1'}")
    v2 = JOIN.replace("id: join", "id: join\nmetadata: {version: '2'}")
    now = [1_000_000_000_000]

    async def go():
        redis = Redis.from_url(redis_url)
        good = _adapter(redis, [v1], {"count": lambda ctx: ctx.node_id}, version_grace_s=1.0)
        old = _adapter(redis, [v2], {"count": lambda ctx: ctx.node_id}, version_grace_s=1.0)
        old.engine.clock = lambda: now[0]  # a clock the test moves, instead of sleeping
        run_id, scheduled = await good.engine.start_run("join", {})
        jobs = {job.node_id: job for _, job in scheduled}
        assert (await old.engine.handle(jobs["a"])).retry_after_s is not None  # starts the grace clock
        await good.engine.handle(jobs["a"])  # a matching worker took a step: the clock is reset
        now[0] += 3_600_000  # an hour later the mismatched worker sees b
        handled = await old.engine.handle(jobs["b"])
        view = await good.inspect(run_id)
        await good.close()
        await old.close()
        await redis.aclose()
        return handled, view

    handled, view = asyncio.run(go())
    assert handled.retry_after_s is not None  # it waits again instead of failing a healthy run
    assert view.status == "running"


def test_a_sleep_longer_than_the_running_ttl_keeps_its_run(redis_url, redis_sync):
    doc = """
id: nap
nodes:
  - {id: a, uses: count}
  - {id: nap, uses: sleep, params: {duration: 3s}}
  - {id: b, uses: count}
edges:
  - {source: a, target: nap}
  - {source: nap, target: b}
"""

    async def go():
        redis = Redis.from_url(redis_url)
        adapter = _adapter(redis, [doc], {"count": lambda ctx: ctx.node_id}, running_ttl_s=1)
        run_id = await adapter.start_run("nap", {})
        await adapter.start(burst=True)
        view = await adapter.inspect(run_id)
        await adapter.close()
        await redis.aclose()
        return view

    view = asyncio.run(go())
    assert view.status == "completed"  # the keys outlived the 1 s running TTL because the run was asleep
    assert view.outputs["b"] == "b"


def test_redis_context_set_never_leaves_the_state_key_without_expiry(redis_url, redis_sync):
    from flowcraft_cli.distributed.context import RedisContext

    async def go():
        redis = Redis.from_url(redis_url)
        await RedisContext(redis, "fresh", running_ttl_s=100).set("k", None)  # creates the key
        redis_sync.hset("workflow:state:kept", "a", "1")
        redis_sync.expire("workflow:state:kept", 5000)
        await RedisContext(redis, "kept", running_ttl_s=100).set("k", 2)  # keeps the run's own expiry
        redis_sync.hset("workflow:state:bare", "a", "1")
        await RedisContext(redis, "bare", running_ttl_s=100).set("k", 3)
        await RedisContext(redis, "forever", running_ttl_s=0).set("k", 4)  # 0 = forever, as for steps
        await redis.aclose()

    asyncio.run(go())
    assert redis_sync.hget("workflow:state:fresh", "k") == b"null"
    assert 90 <= redis_sync.ttl("workflow:state:fresh") <= 100
    assert 4990 <= redis_sync.ttl("workflow:state:kept") <= 5000
    assert 90 <= redis_sync.ttl("workflow:state:bare") <= 100
    assert redis_sync.ttl("workflow:state:forever") == -1 and redis_sync.hget("workflow:state:forever", "k") == b"4"


def test_a_worker_meeting_an_undecodable_value_fails_only_that_run(redis_url, redis_sync):
    doc = """
id: corrupt
nodes:
  - {id: w, uses: wait}
  - {id: n, uses: count, inputs: payload}
edges:
  - {source: w, target: n}
"""

    async def go():
        redis = Redis.from_url(redis_url)
        adapter = _adapter(redis, [doc, JOIN], {"count": lambda ctx: ctx.node_id}, queue_name="corrupt-queue")
        bad = await adapter.start_run("corrupt", {"payload": 1})
        good = await adapter.start_run("join", {})
        await adapter.start(burst=True)
        redis_sync.hset(f"workflow:state:{bad}", "payload", b"\xff\xfe")  # planted: not JSON, not even UTF-8
        await adapter.resume(bad, action=None)
        await adapter.start(burst=True)  # the worker survives the step that meets it
        views = await adapter.inspect(bad), await adapter.inspect(good)
        await adapter.close()
        await redis.aclose()
        return views

    bad_view, good_view = asyncio.run(go())
    assert good_view.status == "completed"
    assert bad_view.status == "failed", bad_view.status
    assert "payload" in bad_view.reason and "not JSON" in bad_view.reason
    assert bad_view.context["payload"] == "<undecodable: 2 bytes>"


ASKS = """
id: asks
nodes:
  - {id: w, uses: wait}
  - {id: ok, uses: count}
edges:
  - {source: w, target: ok, action: approve}
"""
CALLS_ASKS = """
id: calls-asks
nodes:
  - {id: call, uses: subflow, params: {blueprintId: asks}}
  - {id: after, uses: count}
edges:
  - {source: call, target: after}
"""


def test_a_child_resumed_by_another_client_meanwhile_puts_the_parent_back(redis_url, redis_sync):
    """resume PARENT call: the parent's node is woken, then the child refuses (another client resumed it
    directly in between): the parent awaits again, and the child's end still completes it."""
    from flowcraft_cli.errors import StateConflict

    async def go():
        redis = Redis.from_url(redis_url)
        adapter = _adapter(redis, [CALLS_ASKS, ASKS], {"count": lambda ctx: ctx.node_id})
        engine = adapter.engine
        run_id = await adapter.start_run("calls-asks", {})
        await adapter.start(burst=True)
        child_id = (await adapter.store.read(run_id, "nodes", ["call"]))[0]["child"]
        original = engine.resume

        async def racing_resume(rid, node_id=None, **kw):
            if rid == child_id:  # the other client gets there first
                await adapter.flush(await original(child_id, "w", output="direct", action="approve"))
            return await original(rid, node_id, **kw)

        engine.resume = racing_resume  # type: ignore[method-assign]
        with pytest.raises(StateConflict):
            await engine.resume(run_id, "call", output="late", action="approve")
        engine.resume = original  # type: ignore[method-assign]
        between = await adapter.inspect(run_id)
        await adapter.start(burst=True)
        final = await adapter.inspect(run_id)
        await adapter.close()
        await redis.aclose()
        return between, final

    between, final = asyncio.run(go())
    assert between.status == "awaiting" and between.awaiting_nodes == ["call"]
    assert final.status == "completed", final.reason
    assert final.outputs["after"] == "after"


ONE = """
id: one
nodes: [{id: x, uses: count}]
edges: []
"""
CALLS_ONE = """
id: calls-one
nodes: [{id: call, uses: subflow, params: {blueprintId: one}}]
edges: []
"""


@pytest.mark.parametrize("child_starts", ["between-cancel-and-tombstone", "after-tombstone"])
def test_cancel_racing_a_child_start_always_cancels_the_child(redis_url, redis_sync, child_starts):
    """The subflow step has recorded its child but not created it when the parent is cancelled. Whether the
    child's start commits between cancel's look at it and the tombstone, or after the tombstone, the child
    ends cancelled (carrying its parent) and none of its nodes runs."""
    from flowcraft_cli.errors import RunNotFound

    calls: list[str] = []

    async def go():
        redis = Redis.from_url(redis_url)
        adapter = _adapter(redis, [CALLS_ONE, ONE], {"count": lambda ctx: calls.append(ctx.node_id)})
        engine = adapter.engine
        run_id, scheduled = await engine.start_run("calls-one", {})
        start_run, cancel = engine.start_run, engine.cancel
        held: list[tuple[Any, ...]] = []

        async def paused_start(blueprint_id, run_input=None, **kw):
            held.append((blueprint_id, run_input, kw))  # the step stops right before creating its child
            return kw["run_id"], []

        engine.start_run = paused_start  # type: ignore[method-assign]
        await engine.handle(scheduled[0][1])
        engine.start_run = start_run  # type: ignore[method-assign]
        blueprint_id, run_input, kw = held[0]
        child_id = kw["run_id"]

        async def start_child() -> None:
            await adapter.flush((await start_run(blueprint_id, run_input, **kw))[1])

        if child_starts == "after-tombstone":
            await adapter.cancel(run_id)
            await start_child()
        else:
            async def racing_cancel(rid, reason="cancelled by user"):
                try:
                    return await cancel(rid, reason)
                except RunNotFound:
                    if rid == child_id and not calls:
                        calls.append("child started")
                        await start_child()
                    raise

            engine.cancel = racing_cancel  # type: ignore[method-assign]
            await adapter.cancel(run_id)
            engine.cancel = cancel  # type: ignore[method-assign]
        await adapter.start(burst=True)
        views = await adapter.inspect(run_id), await adapter.inspect(child_id)
        await adapter.close()
        await redis.aclose()
        return views, kw["parent"].to_json()  # the engine passes a typed ParentRef

    (parent, child), parent_ref = asyncio.run(go())
    assert parent.status == "cancelled"
    assert child.status == "cancelled" and "parent run" in (child.reason or "")
    assert child.parent == parent_ref
    assert "x" not in calls


def test_a_parent_outlives_its_child_sleeping_past_the_running_ttl(redis_url, redis_sync):
    """The child sleeps longer than the running TTL while its parent has nothing to do: the child's steps
    keep the parent's keys alive (CONTRACT §6.1), so its end still reaches the parent."""
    parent = """
id: calls-nap
nodes:
  - {id: call, uses: subflow, params: {blueprintId: grand-nap}}
  - {id: after, uses: count}
edges:
  - {source: call, target: after}
"""
    middle = """
id: grand-nap
nodes: [{id: inner, uses: subflow, params: {blueprintId: nap-child}}]
edges: []
"""
    child = """
id: nap-child
nodes:
  - {id: nap, uses: sleep, params: {duration: 4s}}
  - {id: b, uses: count}
edges:
  - {source: nap, target: b}
"""

    async def go():
        redis = Redis.from_url(redis_url)
        adapter = _adapter(redis, [parent, middle, child], {"count": lambda ctx: ctx.node_id}, running_ttl_s=2)
        run_id = await adapter.start_run("calls-nap", {})
        await adapter.start(burst=True)
        view = await adapter.inspect(run_id)
        await adapter.close()
        await redis.aclose()
        return view

    view = asyncio.run(go())
    assert view.status == "completed", view.reason  # a grandparent too: every ancestor outlived the sleep
    assert view.outputs["after"] == "after"


def test_a_child_step_extends_its_ancestors_expiry_and_never_shortens_it(redis_url, redis_sync):
    from flowcraft_cli.distributed.redis_store import RedisStore
    from flowcraft_cli.store import STATE

    redis_sync.set("flowcraft:progress:gp", 1, px=1000)  # about to expire: extended
    redis_sync.set("workflow:status:gp", "{}", ex=3600)  # finished long ago, an hour left: kept
    redis_sync.hset("workflow:state:gp", "k", "1")  # kept forever: stays so
    redis_sync.hset("workflow:state:p", "k", "1")
    redis_sync.expire("workflow:state:p", 1)

    async def go():
        redis = Redis.from_url(redis_url)

        async def step(t):
            t.ancestors = ["gp", "p"]
            t.ttl_s = 60
            t.put(STATE, "x", 1)

        await RedisStore(redis).transact("child", step)
        await redis.aclose()

    asyncio.run(go())
    assert 50_000 < redis_sync.pttl("flowcraft:progress:gp") <= 60_000
    assert 3_500_000 < redis_sync.pttl("workflow:status:gp") <= 3_600_000
    assert redis_sync.ttl("workflow:state:gp") == -1
    assert 50 < redis_sync.ttl("workflow:state:p") <= 60
    assert redis_sync.exists("flowcraft:run:gp") == 0  # a missing key is not created
