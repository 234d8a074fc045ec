"""A worker slot that finishes a step runs more work itself instead of going back to arq: a queued step of
the same run (a fan-out's branch: ``RunTxn.steal_queued``), else the queue's next ready job
(``Engine.pick_ms``). Both are claimed and recovered like any step. Real Redis, real arq workers."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from flowcraft_cli.distributed import keys
from flowcraft_cli.distributed.views import RunReader
from flowcraft_cli.jobs import Job
from flowcraft_cli.store import NODES
from tests.harness import count_commits, make_adapter

FAN = {"id": "fan", "nodes": [{"id": "s", "uses": "tag"}, *({"id": f"b{i}", "uses": "tag"} for i in range(30)),
                              {"id": "j", "uses": "tag"}],
       "edges": [e for i in range(30) for e in ({"source": "s", "target": f"b{i}"}, {"source": f"b{i}", "target": "j"})]}
ONE = {"id": "one", "nodes": [{"id": "x", "uses": "tag"}], "edges": []}


def test_a_fan_outs_branches_run_on_the_slots_that_are_busy_with_it(redis_url):
    """30 branches, 3 worker slots: arq hands out a few branch jobs; every other branch is claimed by a
    branch's commit on the same slot, its queue job dropped. Every node runs once; nothing is left queued."""
    calls: list[str] = []

    def tag(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [FAN], {"tag": tag}, queue_name="take-1", concurrency=3)
        run_id = await a.start_run("fan", {})
        await a.start(burst=True)
        view = await a.inspect(run_id)
        ran_by_arq = a._worker.jobs_complete
        left = await a.redis.zcard("take-1")
        await a.close()
        await a.redis.aclose()
        return view, ran_by_arq, left

    view, ran_by_arq, left = asyncio.run(go())
    assert view.status == "completed", view.reason
    assert sorted(calls) == sorted(["s", "j", *(f"b{i}" for i in range(30))])
    assert ran_by_arq <= 6  # the start, and the few branch jobs arq handed out before they were claimed
    assert left == 0


def test_a_branch_whose_job_another_worker_took_is_left_to_that_worker(redis_url):
    """Worker B has taken a branch's queue job (arq's in-progress lock) and not claimed it (a first delivery
    may run its node before claiming it: Engine.defer_claims). Worker A's commit would claim that queued
    branch for its own slot; it finds the job locked and leaves it to B: the branch runs once, on B.
    (Before deferred claims, A's commit claimed it and B's claim found it held by A.)"""
    calls: list[str] = []

    def tag(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    doc = {"id": "two", "nodes": [{"id": "s", "uses": "tag"}, {"id": "p", "uses": "tag"}, {"id": "q", "uses": "tag"}],
           "edges": [{"source": "s", "target": "p"}, {"source": "s", "target": "q"}]}

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [doc], {"tag": tag}, queue_name="take-2")
        b = make_adapter(Redis.from_url(redis_url), [doc], {"tag": tag}, queue_name="take-2")
        a.create_worker()  # inline steps and taking on, as in a worker process
        await a.workers.beat(a._fields())  # A is alive
        run_id, scheduled = await a.engine.start_run("two", {})
        s = await a.engine.handle(scheduled[0][1])  # s fires p (inline for A) and q (queued)
        assert s.inline is not None and s.inline.job.node_id == "p"
        q_job = Job(run_id, "q", 1)
        await b.queue.pool.psetex(f"arq:in-progress:{q_job.job_id}", 15000, b"1")  # B took q's job
        p = await a.engine.handle(s.inline.job, s.inline)  # p's commit leaves q: its job is locked
        q = await b.engine.handle(q_job)  # B claims q and runs it
        view = await a.inspect(run_id)
        queued = await a.redis.zscore("take-2", q_job.job_id)
        for ad in (a, b):
            await ad.close()
            await ad.redis.aclose()
        return p, q, view, queued

    p, q, view, queued = asyncio.run(go())
    assert p.inline is None and not p.unqueued
    assert q.outcome.value == "ok" and view.status == "completed"
    assert sorted(calls) == ["p", "q", "s"]
    assert queued is not None  # still B's job, which arq finishes when B's step returns


def test_a_slot_takes_the_next_runs_job_and_finishes_it_in_the_queue(redis_url):
    """Ten one-node runs on one slot: after the first, each commit takes the next run's job itself, and that
    job's own commit removes it from arq (no job keys are left)."""

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": lambda ctx: ctx.node_id}, queue_name="take-3",
                         concurrency=1)
        runs = [await a.start_run("one", {}) for _ in range(10)]
        await a.start(burst=True)
        statuses = [(await a.status(r))["status"] for r in runs]
        taken, by_arq = a.jobs_taken, a._worker.jobs_complete
        leftovers = [k for r in runs async for k in a.redis.scan_iter(f"arq:*{r}*")]
        await a.close()
        await a.redis.aclose()
        return statuses, taken, by_arq, leftovers

    statuses, taken, by_arq, leftovers = asyncio.run(go())
    assert statuses == ["completed"] * 10
    assert taken >= 8 and taken + by_arq == 10
    assert leftovers == []


def test_a_taken_job_whose_worker_dies_is_handed_on_by_arq(redis_url):
    """A slot took a job (its lock, one lease long) and its worker died before running it: the lock lapses
    and another worker runs the job."""
    calls: list[str] = []

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": lambda ctx: calls.append(ctx.run_id)},
                         queue_name="take-4", lease_s=1)
        a.create_worker()
        first = await a.start_run("one", {})
        second, _ = await a.engine.start_run("one", {})
        first_job = Job(first, "x", 1)
        await a.queue.pool.psetex(f"arq:in-progress:{first_job.job_id}", 15000, b"1")  # as arq does
        handled = await a.engine.handle(first_job)
        assert handled.picked is not None and second in handled.picked[0]  # took the second run's job...
        await a.close()  # ... and "died" before running it
        await a.redis.aclose()
        b = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": lambda ctx: calls.append(ctx.run_id)},
                         queue_name="take-4")
        deadline = asyncio.get_running_loop().time() + 10
        while (await b.status(second)) is None and asyncio.get_running_loop().time() < deadline:
            await b.start(burst=True)  # the lock lapses after 1 s: then arq hands the job to b
            await asyncio.sleep(0.2)
        status = await b.status(second)
        await b.close()
        await b.redis.aclose()
        return status

    status = asyncio.run(go())
    assert status is not None and status["status"] == "completed"
    assert calls.count(calls[-1]) == 1


CHAIN3 = {"id": "chain3", "nodes": [{"id": f"n{i}", "uses": "tag"} for i in range(3)],
          "edges": [{"source": "n0", "target": "n1"}, {"source": "n1", "target": "n2"}]}


def test_a_job_whose_commit_hands_its_slot_on_leaves_the_queue_at_once(redis_url):
    """n0's commit claims n1 for the same slot: n0's queue job is done then, not when the chain ends. Left in
    the queue, every look a worker takes at the queue meanwhile finds it (locked), and pays a round of
    WATCH/EXISTS/ZSCORE to learn so; a 200-branch fan-out running on one slot cost 2 commands a node that
    way. Both kinds of job: one arq handed over, and one a commit took for its worker."""
    calls: list[str] = []

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [CHAIN3], {"tag": lambda ctx: calls.append(ctx.node_id)},
                         queue_name="take-5")
        a.create_worker()
        first = await a.start_run("chain3", {})
        second, _ = await a.engine.start_run("chain3", {})
        jobs = [Job(r, "n0", 1) for r in (first, second)]
        out = []
        await a.queue.pool.psetex(f"arq:in-progress:{jobs[0].job_id}", 15000, b"1")  # as arq does
        handled = await a.engine.handle(jobs[0])  # arq's job: its commit claims n1 inline
        out.append((handled.inline is not None, await a.redis.zscore("take-5", jobs[0].job_id),
                    await a.redis.exists(f"arq:job:{jobs[0].job_id}")))
        while handled.inline is not None:
            handled = await a.engine.handle(handled.inline.job, handled.inline)
        assert handled.picked is not None and handled.picked[0] == jobs[1].job_id  # took the second run's n0
        a.engine.taken_jobs.add(jobs[1].job_id)  # as ArqAdapter._run_picked does
        handled = await a.engine.handle(jobs[1])
        out.append((handled.inline is not None, await a.redis.zscore("take-5", jobs[1].job_id),
                    await a.redis.exists(f"arq:job:{jobs[1].job_id}", f"arq:in-progress:{jobs[1].job_id}")))
        while handled.inline is not None:
            handled = await a.engine.handle(handled.inline.job, handled.inline)
        statuses = [(await a.status(r))["status"] for r in (first, second)]
        await a.close()
        await a.redis.aclose()
        return out, statuses

    out, statuses = asyncio.run(go())
    assert out == [(True, None, 0), (True, None, 0)]
    assert statuses == ["completed", "completed"] and calls == ["n0", "n1", "n2"] * 2


def test_a_queued_retry_is_not_claimed_before_its_delay(redis_url):
    """A branch's attempt failed on worker B and waits out its retry delay, its next attempt queued for later.
    Worker A, whose commit queued the branch in the first place (so it remembers it as queued), finishes its
    own branch and looks for a queued sibling to run: the waiting retry is not one (it once was, and ran at
    once, with no delay at all)."""
    calls: list[tuple[str, int]] = []

    def tag(ctx):
        calls.append((ctx.node_id, ctx.attempt))
        if ctx.node_id == "q" and ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return ctx.node_id

    doc = {"id": "later", "nodes": [{"id": "s", "uses": "tag"}, {"id": "p", "uses": "tag"},
                                    {"id": "q", "uses": "tag", "config": {"maxRetries": 2, "retryDelay": 60000}}],
           "edges": [{"source": "s", "target": "p"}, {"source": "s", "target": "q"}]}

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [doc], {"tag": tag}, queue_name="take-6")
        b = make_adapter(Redis.from_url(redis_url), [doc], {"tag": tag}, queue_name="take-6")
        for ad in (a, b):
            ad.create_worker()
            await ad.workers.beat(ad._fields())
        run_id, scheduled = await a.engine.start_run("later", {})
        s = await a.engine.handle(scheduled[0][1])  # s fires p (inline for A) and q (queued: A remembers it)
        assert s.inline is not None and s.inline.job.node_id == "p"
        failed = await b.engine.handle(Job(run_id, "q", 1))  # B runs q's first attempt: it fails
        assert failed.failed
        # A no longer remembers the run's fields (after 2,000 other runs it forgets them; what it queued it
        # remembers longer), so its commit decides on q's record as it is now
        a.store.forget(run_id)
        p = await a.engine.handle(s.inline.job, s.inline)  # p's commit: is there a queued sibling to run?
        record = await a.redis.hget(f"flowcraft:run:{run_id}", "n:q")
        retry = await a.redis.zscore("take-6", Job(run_id, "q", 1, attempt=2).job_id)
        for ad in (a, b):
            await ad.close()
            await ad.redis.aclose()
        return p, record, retry

    p, record, retry = asyncio.run(go())
    assert p.inline is None, f"claimed {p.inline.job} before its retry delay"
    assert b'"status":"queued"' in record and b'"attempt":2' in record
    assert retry is not None  # still waiting in the queue, due in a minute
    assert calls == [("s", 1), ("q", 1), ("p", 1)]


async def _dies(a) -> None:
    """A worker dies: its connections close and its lease lapses (its list of steps stays)."""
    await a.close()
    await a.redis.delete(f"flowcraft:worker:{a.worker_id}")
    await a.redis.aclose()


async def _pair(redis_url, doc, tag, queue):
    """Two live workers (A, B) of one queue, with a lease of 1 s. They take a chain one commit a node (each claims
    the next inline): these tests stop between the steps of a chain; groups (engine.ahead) are in
    test_group_commits."""
    pair = [make_adapter(Redis.from_url(redis_url), [doc], {"tag": tag}, queue_name=queue, lease_s=1)
            for _ in range(2)]
    for ad in pair:
        ad.create_worker()
        ad.engine.fuse_steps = False
        await ad.workers.beat(ad._fields())
    return pair


async def _finish(b, run_id):
    """B works the queue until it is empty; the run as it is then."""
    await b.start(burst=True)
    view = await b.inspect(run_id)
    await b.close()
    await b.redis.aclose()
    return view


async def _taken_over(a, b, run_id):
    """A dies; B recovers its steps and works the queue until it is empty: the run as it is then."""
    await _dies(a)
    await b.recover_dead_workers([a.worker_id])
    return await _finish(b, run_id)


def _lost(view) -> list[str]:
    """The nodes of a run's lost attempts, in the order they were lost."""
    return [e["node_id"] for e in view.to_json()["timeline"] if e["outcome"] == "lost"]


def _gate(node_id: str):
    """A node function that stops at ``node_id`` until released: (function, started, release)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def tag(ctx):
        if ctx.node_id == node_id:
            started.set()
            await release.wait()
        return ctx.node_id

    return tag, started, release


CHAIN4 = {"id": "chain4", "nodes": [{"id": f"n{i}", "uses": "tag"} for i in range(4)],
          "edges": [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(3)]}


def test_a_worker_dead_on_the_third_step_of_an_inline_chain_is_recovered(redis_url):
    """n0's job runs n0, n1 and n2 on one slot, the later two claimed inline by the commit before, all under
    n0's entry in the worker's list of steps. The worker dies running n2: whoever recovers the entry records
    n2's attempt as lost and queues n2 again (not n0, which is done); the run completes, n2 and n3 run once
    more and once."""
    calls: list[str] = []

    async def go():
        a, b = await _pair(redis_url, CHAIN4, lambda ctx: calls.append(ctx.node_id), "take-7")
        run_id, scheduled = await a.engine.start_run("chain4", {})
        n0 = await a.engine.handle(scheduled[0][1])
        n1 = await a.engine.handle(n0.inline.job, n0.inline)
        assert n1.inline is not None and n1.inline.job.node_id == "n2"
        # A dies as n2 starts: its claim stays, listed under n0's job id; its lease lapses
        listed = await a.redis.hkeys(f"flowcraft:worker-steps:{a.worker_id}")
        await _dies(a)
        recovered = await b.recover_dead_workers([a.worker_id])
        left = await b.redis.hlen(f"flowcraft:worker-steps:{a.worker_id}")
        view = await _finish(b, run_id)
        return listed, recovered, view, left, run_id

    listed, recovered, view, left, run_id = asyncio.run(go())
    assert listed == [Job(run_id, "n0", 1).job_id.encode()]
    assert recovered == 1 and left == 0
    assert view.status == "completed", view.reason
    assert calls == ["n0", "n1", "n2", "n3"]  # n2's lost attempt never ran its node: A died before it did
    lost = [e for e in view.to_json()["timeline"] if e["outcome"] == "lost"]
    assert [e["node_id"] for e in lost] == ["n2"]


def test_an_active_group_created_again_soon_after_gets_an_expiry(redis_url):
    """Runs A and B each empty the queue's group of active runs at their end; C, started right after, creates
    it again: it gets an expiry at once (a key without one, and the entries of runs that never end, would
    stay for good on a queue that goes quiet)."""
    async def go():
        a = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": lambda ctx: 1}, queue_name="take-8")
        for _ in range(2):
            run_id, scheduled = await a.engine.start_run("one", {})
            await a.engine.handle(scheduled[0][1])
        await a.engine.start_run("one", {})
        pttl = await a.redis.pttl("flowcraft:runs-by-status:active:take-8")
        await a.close()
        await a.redis.aclose()
        return pttl

    assert asyncio.run(go()) > 0


def test_a_group_of_runs_is_never_emptied_and_views_skip_its_placeholder(redis_url):
    """The last run leaving the active group leaves the group's placeholder behind, with the group's expiry (so
    the next run to start need not look at it), and the run list shows runs only."""
    async def go():
        a = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": lambda ctx: 1}, queue_name="take-9")
        run_id, scheduled = await a.engine.start_run("one", {})
        await a.engine.handle(scheduled[0][1])
        active = keys.runs_by_status_key("active", "take-9")
        left = (await a.redis.zrange(active, 0, -1), await a.redis.pttl(active))
        reader = RunReader(a.redis, "take-9")
        listed = ([r.run_id for r in await reader.list_runs(status="running")],
                  [r.run_id for r in await reader.list_runs()],
                  [r.run_id for r in await reader.list_runs(status="completed")])
        await a.close()
        await a.redis.aclose()
        return run_id, left, listed

    run_id, (members, pttl), listed = asyncio.run(go())
    assert members == [keys.GROUP_PLACEHOLDER.encode()] and pttl > 0
    assert listed == ([], [run_id], [run_id])


def test_a_retry_claimed_under_its_own_steps_entry_is_recovered(redis_url):
    """q's first attempt fails with no retry delay, and q's own commit claims the retry to run next, under q's
    entry, which still names attempt 1. The worker dies running attempt 2: that attempt is recovered."""
    def tag(ctx):
        if ctx.node_id == "q" and ctx.attempt == 1:
            raise RuntimeError("once")
        return ctx.node_id

    doc = {"id": "rt", "nodes": [{"id": "s", "uses": "tag"}, {"id": "p", "uses": "tag"},
                                 {"id": "q", "uses": "tag", "config": {"maxRetries": 3}}],
           "edges": [{"source": "s", "target": "p"}, {"source": "s", "target": "q"}]}

    async def go():
        a, b = await _pair(redis_url, doc, tag, "take-9")
        run_id, scheduled = await a.engine.start_run("rt", {})
        s = await a.engine.handle(scheduled[0][1])
        q1 = await a.engine.handle(Job(run_id, "q", 1))
        assert q1.inline is not None and (q1.inline.job.node_id, q1.inline.job.attempt) == ("q", 2)
        await a.engine.handle(s.inline.job, s.inline)
        await _dies(a)
        await b.recover_dead_workers([a.worker_id])
        return await _finish(b, run_id)

    view = asyncio.run(go())
    assert view.status == "completed", view.reason
    assert [(e["node_id"], e["attempt"]) for e in view.to_json()["timeline"] if e["outcome"] == "lost"] == [("q", 2)]


def test_a_sibling_claimed_by_a_batchs_commit_is_recovered(redis_url):
    """bt's commit queues its items and claims the queued sibling y under bt's entry; bt's record stays running
    under that entry while its items run. The worker dies running y: y is recovered, not bt (which goes on as
    it was, its items run by whoever takes their jobs)."""
    def tag(ctx):
        return [1, 2] if ctx.node_id == "s" else ctx.node_id

    doc = {"id": "bsib", "nodes": [{"id": "s", "uses": "tag"}, {"id": "x", "uses": "tag"},
                                   {"id": "bt", "uses": "batch", "params": {"worker": "tag"}},
                                   {"id": "y", "uses": "tag"}],
           "edges": [{"source": "s", "target": "x"}, {"source": "s", "target": "bt"}, {"source": "s", "target": "y"}]}

    async def go():
        a, b = await _pair(redis_url, doc, tag, "take-10")
        run_id, scheduled = await a.engine.start_run("bsib", {})
        s = await a.engine.handle(scheduled[0][1])
        assert s.inline is not None and s.inline.job.node_id == "x"
        bt = await a.engine.handle(Job(run_id, "bt", 1))
        assert bt.inline is not None and bt.inline.job.node_id == "y"
        await _dies(a)
        await b.recover_dead_workers([a.worker_id])
        return await _finish(b, run_id)

    view = asyncio.run(go())
    assert view.status == "completed", view.reason
    # y, and x, which s's commit claimed for A too (under s's entry) and A never got to
    assert sorted(_lost(view)) == ["x", "y"]


def test_the_reconciler_recovers_an_inline_step_whose_workers_list_is_gone(redis_url):
    """The worker died running n2 of an inline chain and its list of steps is gone too (expired): the
    reconciler finds n2's claim held by no one and recovers it, although the claim names the chain's entry
    (n0's job), not n2's own job."""
    async def go():
        a, b = await _pair(redis_url, CHAIN4, lambda ctx: ctx.node_id, "take-11")
        run_id, scheduled = await a.engine.start_run("chain4", {})
        n0 = await a.engine.handle(scheduled[0][1])
        await a.engine.handle(n0.inline.job, n0.inline)
        await a.redis.delete(f"flowcraft:worker-steps:{a.worker_id}")
        await _dies(a)
        outcome = await b.reconcile(run_id)
        return outcome, await _finish(b, run_id)

    outcome, view = asyncio.run(go())
    assert outcome.enqueued, outcome
    assert view.status == "completed", view.reason
    assert _lost(view) == ["n2"]


@pytest.mark.parametrize("lapses_again", [False, True])
def test_a_step_whose_worker_came_back_stays_listed_and_its_successor_too(redis_url, lapses_again):
    """B takes A for dead (A was paused past its lease) and looks at A's steps just as A is back: n0 is held
    by A, so B recovers nothing, and must not drop n0's entry either, even when A's lease lapses again before
    B forgets what it recovered: n0's commit then claims n1 under the entry, and when A dies for good, n1 is
    found there and recovered."""
    tag, started, release = _gate("n0")

    async def go():
        a, b = await _pair(redis_url, CHAIN4, tag, "take-12")
        run_id, scheduled = await a.engine.start_run("chain4", {})
        n0 = asyncio.ensure_future(a.engine.handle(scheduled[0][1]))
        await started.wait()
        forget = b.workers.forget

        async def lapse_then_forget(worker_id, recovered=()):
            await b.redis.delete(f"flowcraft:worker:{worker_id}")  # A pauses past its lease again
            return await forget(worker_id, recovered)

        if lapses_again:
            b.workers.forget = lapse_then_forget
        await b.recover_dead_workers([a.worker_id])  # A is alive when B decides: n0 is held
        b.workers.forget = forget
        listed = await a.redis.hlen(f"flowcraft:worker-steps:{a.worker_id}")
        release.set()
        handled = await n0
        assert handled.inline is not None and handled.inline.job.node_id == "n1"
        return listed, await _taken_over(a, b, run_id)  # A dies before running n1

    listed, view = asyncio.run(go())
    assert listed == 1
    assert view.status == "completed", view.reason
    assert _lost(view) == ["n1"]


def test_a_step_that_commits_between_the_recoverers_scan_and_its_read_stays_listed(redis_url):
    """A runs n1 (claimed inline under n0's entry) past its lease. B recovers A: n0 is done, and B's scan of the
    run finds n1 running under the entry; A's n1 commit lands (claiming n2 under the same entry) before B's
    transaction reads n1. B must not take that for "nothing to recover" and drop the entry: n2 runs under it,
    and when A dies for good, n2 is recovered from it."""
    tag, started, release = _gate("n1")

    async def go():
        a, b = await _pair(redis_url, CHAIN4, tag, "take-13")
        run_id, scheduled = await a.engine.start_run("chain4", {})
        n0 = await a.engine.handle(scheduled[0][1])
        n1 = asyncio.ensure_future(a.engine.handle(n0.inline.job, n0.inline))
        await started.wait()
        await a.redis.delete(f"flowcraft:worker:{a.worker_id}")  # A's lease lapses (a pause); it goes on later
        read_all = b.store.read_all

        async def scan_then_a_commits(run, kind, **kw):
            got = await read_all(run, kind, **kw)
            if kind == NODES and not release.is_set():
                release.set()
                handled = await n1  # A's n1 commit lands: it claims n2 under n0's entry
                assert handled.inline is not None and handled.inline.job.node_id == "n2"
            return got

        b.store.read_all = scan_then_a_commits
        await b.recover_dead_workers([a.worker_id])
        b.store.read_all = read_all
        listed = await b.redis.hlen(f"flowcraft:worker-steps:{a.worker_id}")
        return listed, await _taken_over(a, b, run_id)  # A dies before running n2

    listed, view = asyncio.run(go())
    assert listed == 1
    assert view.status == "completed", view.reason
    assert _lost(view) == ["n2"]


def test_a_burst_worker_runs_what_an_inline_step_queued_after_the_queue_looked_empty(redis_url):
    """A burst worker ends once arq finds the queue empty and the running jobs done. A chain's second node runs
    inline, out of the queue, so the queue looks empty while it runs; when it fails, its retry is queued for
    later. The burst goes on until that retry ran (it once ended with the run still going: the README's Python
    API example failed now and then)."""
    doc = """
id: retried
nodes:
  - {id: a, uses: quick}
  - {id: b, uses: flaky, config: {maxRetries: 2, retryDelay: 50}}
edges:
  - {source: a, target: b}
"""

    async def flaky(ctx):
        if ctx.attempt == 1:
            await asyncio.sleep(0.3)  # long enough for the burst to look at the queue while it runs
            raise RuntimeError("first attempt fails")
        return "ok"

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [doc], {"quick": lambda ctx: 1, "flaky": flaky},
                         queue_name="take-burst")
        run_id = await a.start_run("retried", {})
        await a.start(burst=True)
        view = await a.inspect(run_id)
        await a.close()
        await a.redis.aclose()
        return view

    view = asyncio.run(go())
    assert view.status == "completed", view.status


def test_a_worker_whose_slots_took_all_they_could_looks_at_the_queue_again_at_once(redis_url):
    """Found in the scale benchmark (a batch of 2,000 items ran 1,500 of them in 2 s, then 8 a second): a batch
    queues its item jobs at once and pushes WAKE_CAP (64) wake-up tokens. Each look at the queue fills the
    worker's free slots; the items end before the worker waits, and it then blocked on the wake-up list, which
    had run dry although hundreds of jobs were ready: from then on one look a ``idle_s``. A worker whose last
    look filled every free slot looks again at once. With ``idle_s`` at 60 s, one such wait outlasts the
    deadline; the batch takes a few seconds."""
    doc = {"id": "many", "nodes": [{"id": "items", "uses": "batch", "params": {"worker": "noop"},
                                    "inputs": "items"}], "edges": []}

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [doc], {"noop": lambda ctx: ctx.input}, queue_name="take-dry",
                         concurrency=5, idle_s=60)
        task = asyncio.ensure_future(a.start())
        run_id = await a.start_run("many", {"items": list(range(2000))})
        deadline = asyncio.get_running_loop().time() + 30
        while (status := await a.status(run_id)) is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        a.stop()
        await task
        await a.close()
        await a.redis.aclose()
        return status

    status = asyncio.run(go())
    assert status is not None and status["status"] == "completed"


def test_a_commit_tries_few_queued_siblings_that_another_worker_holds(redis_url):
    """Found with two workers on a 1 -> 200 -> 1 fan, which stalled 2.5-5 s one run in two: worker A queued the
    branches, so its commits claim queued ones for its slots (newest first), but worker B had taken most of
    their jobs and ran them unclaimed. Each of A's commits tried them one by one, every try refused by the
    check that no worker holds the job (one round trip), and once it kept happening, a pause before the next
    (up to 50 ms, the run's other steps on A waiting behind it): hundreds of tries. (Siblings B had already
    done went the same way: A's memory of their records was stale.) Now a commit refused after claiming a
    queued sibling decides again at once, twice at most, then claims none and forgets the run's queued
    siblings (the queue's next job is then taken by a commit that checks its lock itself)."""
    calls: list[str] = []
    doc = {"id": "wide", "nodes": [{"id": "s", "uses": "tag"}, *({"id": f"b{i:02d}", "uses": "tag"} for i in range(40))],
           "edges": [{"source": "s", "target": f"b{i:02d}"} for i in range(40)]}

    def tag(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [doc], {"tag": tag}, queue_name="take-held")
        a.create_worker()
        await a.workers.beat(a._fields())
        run_id, scheduled = await a.engine.start_run("wide", {})
        s = await a.engine.handle(scheduled[0][1])  # s fires b00 (inline for A) and queues the rest
        assert s.inline is not None and s.inline.job.node_id == "b00"
        for i in range(10, 40):  # B took the newest 30 branch jobs, and runs them unclaimed
            await a.queue.pool.psetex(f"arq:in-progress:{Job(run_id, f'b{i:02d}', 1).job_id}", 15000, b"1")
        commits = count_commits(a)
        b00 = await a.engine.handle(s.inline.job, s.inline)
        await a.close()
        await a.redis.aclose()
        return b00, commits[0]

    b00, commits = asyncio.run(go())
    assert b00.outcome.value == "ok" and commits <= 3, commits
    assert b00.inline is None or b00.inline.job.node_id < "b10"  # never one B holds
