"""The step protocol under faults, driven by hand through the engine and the adapter against a real Redis:
store errors inside a node, arq's job timeout, lost claims, fencing, the worker registry."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import yaml
from arq.worker import Worker, func
from redis.asyncio import Redis
from redis.exceptions import RedisError

from flowcraft_cli.distributed import keys
from flowcraft_cli.distributed.adapter import ArqAdapter
from flowcraft_cli.distributed.queue import (
    STEP_FUNCTION,
    ArqQueue,
    WakingWorker,
    arq_pool_for,
    deserialize,
    serialize,
)
from flowcraft_cli.engine import Recovery, StepOutcome
from flowcraft_cli.jobs import Job
from flowcraft_cli.store import NODES
from tests.harness import make_adapter

CHAIN = """
id: chain
nodes:
  - {id: a, uses: reader}
  - {id: b, uses: echo}
edges:
  - {source: a, target: b}
"""


def _adapter(redis: Redis, docs, nodes, **kw) -> ArqAdapter:
    return make_adapter(redis, docs, nodes, **{"queue_name": "protocol-queue", **kw})


def _run_one(redis_url: str, doc: str, nodes, **kw):
    """Start one run of ``doc``, drain the queue with a burst worker, return the run's view."""

    async def go():
        redis = Redis.from_url(redis_url)
        adapter = _adapter(redis, [doc], nodes, **kw)
        run_id = await adapter.start_run(yaml.safe_load(doc)["id"], {})
        await adapter.start(burst=True)
        view = await adapter.inspect(run_id)
        await adapter.close()
        await redis.aclose()
        return view

    return asyncio.run(go())


async def _list(redis, worker_id: str, job_id: str, job: Job) -> None:
    """List a step under a worker, as the claim's transaction does (RedisStore: Txn.listing)."""
    await redis.hset(keys.worker_steps_key(worker_id), job_id, json.dumps(job.to_dict()))


def test_a_store_error_inside_a_node_hands_the_step_back(redis_url, redis_sync):
    """Hole 3: a Redis error inside ``ctx.context.get`` is the worker's trouble, not the node's: the attempt
    is handed back (not recorded as failed, not retried as attempt 2) and runs again."""
    calls: list[int] = []

    async def reader(ctx):
        calls.append(ctx.attempt)
        if len(calls) == 1:  # the first time, Redis refuses the run context's key for a moment (NOPERM)
            admin = Redis.from_url(redis_url)
            await admin.execute_command("ACL", "SETUSER", "default", "resetkeys", "~flowcraft:*", "~arq:*")
            try:
                return await ctx.context.get("seed")
            finally:
                await admin.execute_command("ACL", "SETUSER", "default", "allkeys")
                await admin.aclose()
        return await ctx.context.get("seed")

    async def go():
        redis = Redis.from_url(redis_url)
        adapter = _adapter(redis, [CHAIN], {"reader": reader, "echo": lambda ctx: ctx.input})
        run_id, scheduled = await adapter.engine.start_run("chain", {"seed": 7})
        job = scheduled[0][1]
        try:
            with pytest.raises(RedisError):
                await adapter.engine.handle(job)  # the adapter turns this into arq's Retry (handed back)
        finally:
            await redis.execute_command("ACL", "SETUSER", "default", "allkeys")
        rec = (await adapter.store.read(run_id, "nodes", ["a"]))[0]
        handled = await adapter.engine.handle(job)  # redelivered: this worker takes its claim back
        await adapter.flush(handled.scheduled)
        await adapter.start(burst=True)
        view = await adapter.inspect(run_id)
        await adapter.close()
        await redis.aclose()
        return rec, view

    rec, view = asyncio.run(go())
    assert rec["status"] == "running" and rec["attempt"] == 1 and not rec.get("error")
    assert view.status == "completed", view.reason
    assert view.outputs == {"a": 7, "b": 7}
    assert calls == [1, 1]  # the same attempt, run again; never counted as a failure
    assert not [t for t in view.timeline if t["outcome"] == "failed"]


SLOW = """
id: slow
nodes:
  - {id: s, uses: nap, config: {timeout: 3000}}
"""


def test_arqs_job_timeout_never_ends_a_step(redis_url, redis_sync):
    """Hole 5: with job_timeout_seconds 1, a node whose own timeout is 3 s and which takes 1.5 s completes.
    Before, arq killed the step at 1 s and deleted its job while the node went back to queued."""

    async def nap(ctx):
        await asyncio.sleep(1.5)
        return "rested"

    view = _run_one(redis_url, SLOW, {"nap": nap}, job_timeout_s=1)
    assert view.status == "completed", view.reason
    assert view.outputs["s"] == "rested"


def test_the_default_limit_is_job_timeout_exactly(redis_url, redis_sync):
    """No hidden margin: a node without its own timeout gets job_timeout_seconds, and an overrun fails the
    attempt with the limit named."""

    async def nap(ctx):
        await asyncio.sleep(3)

    doc = "id: slow\nnodes:\n  - {id: s, uses: nap}\n"
    view = _run_one(redis_url, doc, {"nap": nap}, job_timeout_s=0.5)
    assert view.status == "failed"
    assert "timed out after 500 ms" in view.reason


def test_recovered_step_fences_off_its_old_claim(redis_url, redis_sync, caplog):
    """A claim taken over by recovery: the old step's commit finds its token gone, drops its result and says
    so; the lost attempt is history; the new job has a new id."""
    gate = asyncio.Event()
    runs: list[str] = []

    async def reader(ctx):
        runs.append(ctx.idempotency_key)
        if len(runs) == 1:
            await gate.wait()
        return len(runs)

    async def go():
        redis = Redis.from_url(redis_url)
        dead = _adapter(redis, [CHAIN], {"reader": reader, "echo": lambda ctx: ctx.input}, worker_id="dead-worker")
        alive = _adapter(redis, [CHAIN], {"reader": reader, "echo": lambda ctx: ctx.input}, worker_id="alive-worker")
        run_id, scheduled = await dead.engine.start_run("chain", {})
        job = scheduled[0][1]
        first = asyncio.ensure_future(dead.engine.handle(job))
        while len(runs) < 1:
            await asyncio.sleep(0.01)
        # the first worker is "dead": it never registered, so no heartbeat holds its claim
        outcome, redo = await alive.engine.recover(job, "dead-worker")
        assert outcome == Recovery.RECOVERED and len(redo) == 1
        assert redo[0][1].job_id != job.job_id and redo[0][1].recovery == 1
        handled = await alive.engine.handle(redo[0][1])
        gate.set()
        stale = await first
        await alive.flush(handled.scheduled)
        await alive.start(burst=True)
        view = await alive.inspect(run_id)
        for a in (dead, alive):
            await a.close()
        await redis.aclose()
        return view, stale

    with caplog.at_level(logging.WARNING, logger="flowcraft.engine"):
        view, stale = asyncio.run(go())
    assert view.status == "completed"
    assert view.outputs["a"] == 2  # the recovered attempt's result; the old one was dropped
    assert stale.scheduled == [] and stale.outcome == StepOutcome.STALE
    assert any("fenced off" in r.getMessage() for r in caplog.records)
    assert len(set(runs)) == 1  # one idempotency key for both runs of the one execution
    lost = [t for t in view.timeline if t["outcome"] == "lost"]
    assert [(t["node_id"], t["worker"]) for t in lost] == [("a", "dead-worker")]


def test_worker_registry_and_recovery_of_a_dead_worker(redis_url, redis_sync):
    """A worker registers under flowcraft:worker:<id> with what it serves; a worker whose key expired has
    its listed steps recovered by any other worker, and its arq job is discarded."""

    async def reader(ctx):
        return "ok"

    async def go():
        redis = Redis.from_url(redis_url)
        nodes = {"reader": reader, "echo": lambda ctx: ctx.input}
        ghost = _adapter(redis, [CHAIN], nodes, worker_id="ghost", lease_s=1)
        live = _adapter(redis, [CHAIN], nodes, worker_id="live", lease_s=1)
        await ghost.workers.beat(ghost._fields())
        fields = await redis.hgetall(keys.worker_key("ghost"))
        run_id, scheduled = await ghost.engine.start_run("chain", {})
        job = scheduled[0][1]
        await ghost.flush(scheduled)
        # the ghost takes the job and claims it, then "dies": its key expires, its step list stays
        await _list(redis, "ghost", job.job_id, job)
        rec_before = await ghost.engine.store.read(run_id, "nodes", ["a"])
        await redis.delete(keys.worker_key("ghost"))
        inspect_before = await live.inspect(run_id)
        await asyncio.sleep(1.1)  # past the ghost's lease, on the server's clock
        dead = await live.workers.dead_workers()
        recovered = await live.recover_dead_workers(dead)
        await live.start(burst=True)
        view = await live.inspect(run_id)
        left = await redis.exists(keys.worker_steps_key("ghost"))
        for a in (ghost, live):
            await a.close()
        await redis.aclose()
        return fields, rec_before, inspect_before, dead, recovered, view, left

    fields, rec_before, inspect_before, dead, recovered, view, left = asyncio.run(go())
    assert {k.decode() for k in fields} >= {"host", "pid", "queue", "blueprints", "concurrency", "started_at",
                                           "heartbeat_at", "running"}
    assert b'"chain"' in fields[b"blueprints"]
    assert rec_before[0]["status"] == "queued"  # never claimed: queued again under the same id
    assert dead == ["ghost"] and recovered == 1
    assert view.status == "completed"
    assert left == 0


def test_inspect_says_why_a_queued_node_waits(redis_url, redis_sync):
    """A job that no live worker can run shows the reason instead of sitting queued in silence."""

    async def go():
        redis = Redis.from_url(redis_url)
        nodes = {"reader": lambda ctx: 1, "echo": lambda ctx: ctx.input}
        client = _adapter(redis, [CHAIN], nodes, worker_id="client")
        other = _adapter(redis, ["id: other\nnodes:\n  - {id: x, uses: echo}\n"], nodes, worker_id="other")
        run_id = await client.start_run("chain", {})
        no_worker = await client.inspect(run_id)
        await other.workers.beat(other._fields())  # a live worker that serves another blueprint only
        wrong_worker = await client.inspect(run_id)
        await other.workers.unregister()
        for a in (client, other):
            await a.close()
        await redis.aclose()
        return no_worker, wrong_worker

    no_worker, wrong_worker = asyncio.run(go())
    a = next(n for n in no_worker.nodes if n.node_id == "a")
    assert a.status == "queued" and "no live worker on queue" in a.detail
    a = next(n for n in wrong_worker.nodes if n.node_id == "a")
    assert a.detail == f"no live worker serves blueprint 'chain' version {wrong_worker.blueprint_version}"
    assert a.to_json()["detail"] == a.detail


def test_a_dead_workers_unclaimed_job_is_queued_again(redis_url, redis_sync):
    """The worker died after arq handed it the job and before the claim: the job is queued again as it was."""

    async def go():
        redis = Redis.from_url(redis_url)
        nodes = {"reader": lambda ctx: 1, "echo": lambda ctx: ctx.input}
        live = _adapter(redis, [CHAIN], nodes, worker_id="live2")
        run_id, scheduled = await live.engine.start_run("chain", {})
        job = scheduled[0][1]
        outcome, jobs = await live.engine.recover(job, "gone")
        stale = Job(run_id, "a", job.seq, "exec", 2)
        outcome_stale, _ = await live.engine.recover(stale, "gone")
        await live.close()
        await redis.aclose()
        return outcome, jobs, outcome_stale

    outcome, jobs, outcome_stale = asyncio.run(go())
    assert outcome == Recovery.REQUEUE and jobs == []
    assert outcome_stale == Recovery.NOTHING


def test_worker_start_warns_about_a_fleet_serving_other_blueprints(redis_url, redis_sync, caplog):
    async def go():
        redis = Redis.from_url(redis_url)
        nodes = {"reader": lambda ctx: 1, "echo": lambda ctx: ctx.input}
        first = _adapter(redis, [CHAIN], nodes, worker_id="first", queue_name="fleet-queue")
        second = _adapter(redis, ["id: other\nnodes:\n  - {id: x, uses: echo}\n"], nodes, worker_id="second",
                          queue_name="fleet-queue")
        same = _adapter(redis, [CHAIN], nodes, worker_id="same", queue_name="fleet-queue")
        await first.workers.beat(first._fields())
        with caplog.at_level(logging.WARNING, logger="flowcraft.worker"):
            await same._check_fleet()
            quiet = list(caplog.records)
            await second._check_fleet()
        await first.workers.unregister()
        for a in (first, second, same):
            await a.close()
        await redis.aclose()
        return quiet

    quiet = asyncio.run(go())
    assert quiet == []
    warned = [r.getMessage() for r in caplog.records if "serves other blueprints" in r.getMessage()]
    assert len(warned) == 1 and "chain@" in warned[0] and "other@" in warned[0]


BATCH = """
id: batch
nodes:
  - {id: each, uses: batch, params: {worker: echo}}
"""
PARENT = """
id: parent
nodes:
  - {id: call, uses: subflow, params: {blueprintId: chain}}
"""


def _nodes():
    return {"reader": lambda ctx: 1, "echo": lambda ctx: ctx.input}


def test_recovery_review_findings(redis_url, redis_sync):
    """Races found in review of the lease protocol, each pinned:
    1. a worker without the run's blueprint version leaves a dead worker's step alone (no discard, no forget);
    3. a worker never recovers itself; 4. forgetting a dead worker that came back drops nothing it lists (what
    it listed since, and what it may still run: its own heartbeat lets go of the rest);
    8. one step that cannot be recovered does not block the others."""

    async def go():
        redis = Redis.from_url(redis_url)
        dead = _adapter(redis, [CHAIN], _nodes(), worker_id="d1", lease_s=1)
        foreign = _adapter(redis, [BATCH], _nodes(), worker_id="f1", lease_s=1)
        capable = _adapter(redis, [CHAIN], _nodes(), worker_id="c1", lease_s=1)
        await dead.workers.beat(dead._fields())
        good, jobs = await dead.engine.start_run("chain", {})
        await dead.flush(jobs)
        bad, bad_jobs = await dead.engine.start_run("chain", {})
        await dead.flush(bad_jobs)
        for _, job in jobs + bad_jobs:
            await _list(redis, "d1", job.job_id, job)
        redis_sync.hset(f"flowcraft:run:{bad}", "n:a", b"{not json")  # 8: a run nobody can judge
        await redis.delete(keys.worker_key("d1"))  # the lease lapsed
        # 3: d1 itself, back from a long pause, does not recover its own steps
        assert await dead.recover_dead_workers(["d1"]) == 0
        assert await redis.hlen(keys.worker_steps_key("d1")) == 2
        # 1: a worker that cannot judge the runs (another blueprint, and no definition recorded in Redis, as
        # for runs started before definitions were recorded) leaves everything as it is
        definitions = [k async for k in redis.scan_iter("flowcraft:blueprint:*")]
        saved = {k: await redis.dump(k) for k in definitions}
        await redis.delete(*definitions)
        assert await foreign.recover_dead_workers(["d1"]) == 0
        assert await redis.hlen(keys.worker_steps_key("d1")) == 2
        assert await redis.zscore(foreign.queue_name, jobs[0][1].job_id) is not None
        for k, v in saved.items():
            await redis.restore(k, 0, v, replace=True)
        # 8: the capable worker recovers the good run although the bad one fails to load
        assert await capable.recover_dead_workers(["d1"]) == 1
        left = [k.decode() for k in await redis.hkeys(keys.worker_steps_key("d1"))]
        # 4: d1 comes back and lists a new step before it is forgotten: that listing stays, so does d1
        await dead.workers.beat(dead._fields())
        await _list(redis, "d1", "new-job", jobs[0][1])
        dropped = await capable.workers.forget("d1", left)
        still = [k.decode() for k in await redis.hkeys(keys.worker_steps_key("d1"))]
        in_zset = await redis.zscore(keys.workers_key(capable.queue_name), "d1") is not None
        await capable.start(burst=True)
        view = await capable.inspect(good)
        for a in (dead, foreign, capable):
            await a.close()
        await redis.aclose()
        return bad_jobs[0][1].job_id, left, dropped, still, in_zset, view

    bad_job, left, dropped, still, in_zset, view = asyncio.run(go())
    assert left == [bad_job]  # the one that could not be recovered stays listed
    assert not dropped and sorted(still) == sorted([bad_job, "new-job"]) and in_zset
    assert view.status == "completed"


def test_a_redriven_subflow_queues_its_childs_start_jobs(redis_url, redis_sync):
    """Finding 6: the worker died after creating the child run and before queueing its start jobs; the
    recovered parent step finds the child and queues what is in the child's outbox."""

    async def go():
        redis = Redis.from_url(redis_url)
        dead = _adapter(redis, [PARENT, CHAIN], _nodes(), worker_id="d2")
        live = _adapter(redis, [PARENT, CHAIN], _nodes(), worker_id="l2")
        run_id, jobs = await dead.engine.start_run("parent", {})
        job = jobs[0][1]
        handled = await dead.engine.handle(job)  # claims, creates the child; its jobs are never queued
        assert handled.scheduled
        outcome, redo = await live.engine.recover(job, "d2")
        assert outcome == Recovery.RECOVERED
        await live.flush(redo)
        await live.start(burst=True)
        view = await live.inspect(run_id)
        for a in (dead, live):
            await a.close()
        await redis.aclose()
        return view

    view = asyncio.run(go())
    assert view.status == "completed", view.reason


def test_a_lost_item_of_a_batch_that_moved_on_changes_nothing(redis_url, redis_sync):
    """Finding 7: an item whose worker died after its batch node finished does not reopen the node."""

    async def go():
        redis = Redis.from_url(redis_url)
        doc = BATCH.replace("id: batch\n", "id: batch-w\n") + "  - {id: w, uses: wait}\n"
        live = _adapter(redis, [doc], _nodes(), worker_id="l3")
        run_id = await live.start_run("batch-w", [1, 2])  # the run rests awaiting: not finished
        await live.start(burst=True)
        # an item state left 'running' by a worker that died, lost once before
        rec = (await live.store.read(run_id, "nodes", ["each"]))[0]
        item = Job(run_id, "each", rec["seq"], "item", 1, item=0)
        fields = await redis.hkeys(f"flowcraft:batch:{run_id}")
        skey = next(f.decode() for f in fields if f.decode().endswith("|s|0"))
        await redis.hset(f"flowcraft:batch:{run_id}", skey, '{"status": "running", "attempt": 1, "worker": "gone", '
                         f'"job": "{item.job_id}", "token": "t", "lost_in_row": 1}}')
        outcome, _ = await live.engine.recover(item, "gone")
        view = await live.inspect(run_id)
        await live.close()
        await redis.aclose()
        return outcome, view

    outcome, view = asyncio.run(go())
    assert outcome == Recovery.NOTHING
    assert view.status == "awaiting" and view.outputs["each"] == [1, 2]
    assert next(n for n in view.nodes if n.node_id == "each").status == "completed"


def test_a_second_delivery_on_the_same_worker_leaves_the_listing_alone(redis_url, redis_sync):
    """Finding 5: arq hands the same job to the worker already running it (its lock lapsed while the event
    loop was blocked); the duplicate finds the step held and ends, and the running step stays listed."""
    gate = asyncio.Event()

    async def reader(ctx):
        await gate.wait()
        return 1

    async def go():
        redis = Redis.from_url(redis_url)
        w = _adapter(redis, [CHAIN], {"reader": reader, "echo": lambda ctx: ctx.input}, worker_id="w5")
        run_id, jobs = await w.engine.start_run("chain", {})
        job = jobs[0][1]
        ctx = {"job_id": job.job_id}
        first = asyncio.ensure_future(w.step(ctx, job.to_dict()))
        while not await redis.hexists(keys.worker_steps_key("w5"), job.job_id):
            await asyncio.sleep(0.01)
        second = await w.step(ctx, job.to_dict())
        listed = await redis.hexists(keys.worker_steps_key("w5"), job.job_id)
        gate.set()
        await first
        after = await redis.hexists(keys.worker_steps_key("w5"), job.job_id)
        await w.close()
        await redis.aclose()
        return second, listed, after

    second, listed, after = asyncio.run(go())
    assert second == "held elsewhere"
    assert listed and not after


def _turns_of_a_held_worker(monkeypatch):
    """Counts the turns of every WakingWorker's loop; ``hold`` is a node that signals ``started`` and waits
    for ``gate``. Returns (count, started, gate, hold)."""
    from flowcraft_cli.distributed.queue import WakingWorker

    looks = [0]
    original = WakingWorker._poll_iteration

    async def counted(self):
        looks[0] += 1
        await original(self)

    monkeypatch.setattr(WakingWorker, "_poll_iteration", counted)
    started, gate = asyncio.Event(), asyncio.Event()

    async def hold(ctx):
        started.set()
        await gate.wait()
        return "done"

    return looks, started, gate, hold


def test_a_woken_worker_with_every_slot_busy_does_not_spin(redis_url, redis_sync, monkeypatch):
    """A long-running worker polls with no delay (it is woken instead); with every slot busy its loop must
    wait for a slot, not come straight back (it spun at 100% of a core before)."""
    looks, started, gate, hold = _turns_of_a_held_worker(monkeypatch)

    async def go():
        redis = Redis.from_url(redis_url)
        w = _adapter(redis, ["id: one\nnodes:\n  - {id: a, uses: hold}\n"], {"hold": hold}, worker_id="w6",
                     concurrency=1)
        task = asyncio.ensure_future(w.start())
        run_id = await w.start_run("one", {})
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(0.05)
        before = looks[0]
        await asyncio.sleep(0.5)  # the one slot is busy all along
        during = looks[0] - before
        gate.set()
        while not await w.status(run_id):
            await asyncio.sleep(0.02)
        w.stop()
        await task
        await w.close()
        await redis.aclose()
        return during

    assert asyncio.run(go()) <= 5


def test_wake_tokens_left_by_a_fan_out_are_dropped_not_worked_through(redis_url, redis_sync, monkeypatch):
    """A fan-out pushes a wake-up token per ready branch (up to WAKE_CAP, for a fleet); a lone worker runs
    the branches inline and is left with the tokens. Each cost a look at the queue (three commands) until it
    dropped them all once it found the queue empty."""
    looks, _, _, _ = _turns_of_a_held_worker(monkeypatch)
    doc = {"id": "wide", "nodes": [{"id": "s", "uses": "echo"}, *({"id": f"b{i}", "uses": "echo"} for i in range(40)),
                                   {"id": "j", "uses": "echo"}],
           "edges": [e for i in range(40) for e in ({"source": "s", "target": f"b{i}"},
                                                     {"source": f"b{i}", "target": "j"})]}

    async def go():
        redis = Redis.from_url(redis_url)
        w = _adapter(redis, [doc], {"echo": lambda ctx: ctx.node_id}, worker_id="w-wake", queue_name="wake-q",
                     concurrency=2)
        task = asyncio.ensure_future(w.start())
        run_id = await w.start_run("wide", {})
        deadline = asyncio.get_running_loop().time() + 30
        while not await w.status(run_id) or await redis.llen(keys.wake_key("wake-q")):
            assert asyncio.get_running_loop().time() < deadline, "the run did not end, or its tokens stayed"
            await asyncio.sleep(0.02)
        turns = looks[0]
        status = await w.status(run_id)
        w.stop()
        await task
        await w.close()
        await redis.aclose()
        return status, turns

    status, turns = asyncio.run(go())
    assert status["status"] == "completed"
    assert turns <= 15, turns  # about one per token before (39 tokens), a handful now


def test_a_draining_worker_does_not_spin(redis_url, redis_sync, monkeypatch):
    """Review finding: after stop() the worker takes no job and waits for its running steps; its loop must
    wait with them, not turn tens of thousands of times a second."""
    looks, started, gate, hold = _turns_of_a_held_worker(monkeypatch)

    async def go():
        redis = Redis.from_url(redis_url)
        w = _adapter(redis, ["id: one\nnodes:\n  - {id: a, uses: hold}\n"], {"hold": hold}, worker_id="w7",
                     concurrency=2, shutdown_wait_s=30, idle_s=0.1)
        task = asyncio.ensure_future(w.start())
        run_id = await w.start_run("one", {})
        await asyncio.wait_for(started.wait(), 30)
        w.stop()  # drains: waits for the running step
        await asyncio.sleep(0.05)
        before = looks[0]
        await asyncio.sleep(0.5)
        during = looks[0] - before
        gate.set()
        await task
        status = await w.status(run_id)
        await w.close()
        await redis.aclose()
        return during, status

    during, status = asyncio.run(go())
    assert during <= 20, during  # one wait of idle_s (0.1 s) per turn at most
    assert status and status["status"] == "completed"  # the drained step still finished


def test_a_long_sleep_keeps_its_definition_and_index_alive(redis_url, redis_sync):
    """Review finding: a sleep longer than the running TTL extends the run's keys, and must extend the
    blueprint definition and the queue's run index with them (they were throttled and lapsed first)."""
    doc = """
id: napper
nodes:
  - {id: nap, uses: sleep, params: {duration: 1h}}
  - {id: b, uses: echo}
edges:
  - {source: nap, target: b}
"""

    async def go():
        redis = Redis.from_url(redis_url)
        a = _adapter(redis, [doc], {"echo": lambda ctx: ctx.input}, queue_name="nap-q", running_ttl_s=600,
                     ttl_s=60)
        run_id, scheduled = await a.engine.start_run("napper", {})
        await a.engine.handle(scheduled[0][1])  # the sleep: the run's keys now live 600 s + 1 h
        bp = a.blueprints["napper"]
        ttls = {"run": await redis.ttl(keys.kind_key("run", run_id)),
                "definition": await redis.ttl(keys.blueprint_key(bp.id, bp.version)),
                **{k: await redis.ttl(k) for k in keys.run_index_keys("nap-q") if await redis.exists(k)}}
        await a.close()
        await redis.aclose()
        return ttls

    ttls = asyncio.run(go())
    assert ttls["run"] > 3600
    assert all(t >= ttls["run"] - 5 for t in ttls.values()), ttls


def test_a_finished_run_gives_every_key_it_has_the_finished_ttl(redis_url, redis_sync):
    """At a run's end every key it has gets ``ttl_s``; the hashes a run may never have (joins, a batch's
    items, an outbox) are looked at with one EXISTS first. A fan-in's joins are in the run's hash."""
    doc = """
id: fanttl
nodes:
  - {id: s, uses: echo}
  - {id: x, uses: echo}
  - {id: y, uses: echo}
  - {id: j, uses: echo}
edges:
  - {source: s, target: x}
  - {source: s, target: y}
  - {source: x, target: j}
  - {source: y, target: j}
"""
    view = _run_one(redis_url, doc, {"echo": lambda ctx: ctx.input}, running_ttl_s=6000, ttl_s=60)
    assert view.status == "completed"
    run_id = view.run_id
    assert any(f.startswith(b"j:") for f in redis_sync.hkeys(keys.kind_key("joins", run_id)))
    present = [k for k in keys.run_keys(run_id) if redis_sync.exists(k)]
    assert all(0 < redis_sync.ttl(k) <= 60 for k in present), {k: redis_sync.ttl(k) for k in present}
    assert not redis_sync.exists(keys.kind_key("batch", run_id), keys.kind_key("outbox", run_id))


def test_a_step_cancelled_at_shutdown_is_handed_back_even_if_its_node_swallows_the_cancel(redis_url, redis_sync):
    """A stopping worker cancels a step still running after ``shutdown_wait_s`` and hands it back. A node that
    swallows the cancel and returns must not have that value committed as its output (review finding: it was,
    while nodes ran in the step's own task under asyncio.timeout)."""
    started = asyncio.Event()

    async def stubborn(ctx):
        started.set()
        try:
            await asyncio.sleep(10)
            return "full"
        except asyncio.CancelledError:
            return "partial"  # a node that cleans up and returns what it has

    doc = "id: one\nnodes:\n  - {id: a, uses: stubborn}\n"

    async def go():
        redis = Redis.from_url(redis_url)
        w = _adapter(redis, [doc], {"stubborn": stubborn}, queue_name="cancel-q", worker_id="wc",
                         shutdown_wait_s=0.2)
        task = asyncio.ensure_future(w.start())
        run_id = await w.start_run("one", {})
        await asyncio.wait_for(started.wait(), 30)
        w.stop()  # SIGTERM: in-flight steps get shutdown_wait_s, then are cancelled and handed back
        await task
        status = await w.status(run_id)
        node = await w.store.read(run_id, NODES, ["a"])
        await w.close()
        await redis.aclose()
        return status, node

    status, node = asyncio.run(go())
    assert status is None, f"the run ended ({status}) with the swallowed cancel's value as output: {node}"


def test_a_job_announced_while_a_woken_worker_drops_its_tokens_is_not_left_waiting(redis_url, redis_sync):
    """Review finding: a woken worker that found nothing ready dropped the whole wake list, with the tokens
    of jobs queued after its look; another idle worker with a free slot then slept ``idle_s`` with a job
    ready. Worker A (one slot) and B are driven turn by turn."""
    async def hold(ctx, *args):
        await asyncio.sleep(30)

    async def go():
        redis = Redis.from_url(redis_url)
        pool = arq_pool_for(redis, "rq")
        q = ArqQueue(pool, "rq")

        def worker():
            return WakingWorker(functions=[func(hold, name=STEP_FUNCTION, keep_result=0)], queue_name="rq",
                                redis_pool=pool, max_jobs=1, idle_s=3, keep_result=0, handle_signals=False,
                                job_serializer=serialize, job_deserializer=deserialize)

        a, b = worker(), worker()
        await q.wake(1)  # a token whose job is gone already (a fan-out sibling run inline)
        await a._wait_for_work()  # A is woken by it
        assert getattr(a, "_woken", True)
        await Worker._poll_iteration(a)  # A's look: nothing ready
        await Worker._poll_iteration(b)  # B's look: nothing ready; B goes on to block next
        # two ready jobs are queued now, with a wake token each
        await q.enqueue([Job("r1", "n", 0), Job("r2", "n", 0)])
        await a._wait_for_work()  # A: woken, saw none; drops the tokens only if nothing is ready (two jobs are)
        await Worker._poll_iteration(a)  # A's second look: takes one job (its one slot)
        assert a.job_counter == 1
        ready = await pool.zrangebyscore("rq", min=float("-inf"), max=int(time.time() * 1000) + 1)
        assert len(ready) == 2  # one job running on A, one waiting for a worker
        tokens = await pool.llen(keys.wake_key("rq"))  # what is left for B to be woken by
        # B has a free slot and a job is ready: woken by a token, not after idle_s (the test's deadline is 10 s)
        await asyncio.wait_for(b._wait_for_work(), 10)
        woken = b._woken
        for t in a.tasks.values():
            t.cancel()
        await asyncio.gather(*a.tasks.values(), return_exceptions=True)
        await pool.aclose()
        await redis.aclose()
        return tokens, woken

    tokens, woken = asyncio.run(go())
    assert tokens >= 1 and woken, "the wake tokens of the jobs queued after A's look were dropped"
