"""A queue job delivered for the first time runs its node before it claims it, and its commit claims and
completes the node in one transaction (``Engine.defer_claims``): a run's start costs one transaction less.
What the claim gave is kept: a node still running after ``LATE_CLAIM_S`` is claimed while it runs; a job a
worker runs unclaimed is never claimed by another commit; a node that ran on a stale input runs again,
claimed. A redelivered job (its worker may have died) claims first. Real Redis, real arq adapters."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from flowcraft_cli.distributed import keys
from flowcraft_cli.engine.step import LATE_CLAIM_S
from flowcraft_cli.jobs import Job
from flowcraft_cli.store import STATE
from tests.harness import count_commits, make_adapter

ONE = {"id": "one", "nodes": [{"id": "x", "uses": "tag"}], "edges": []}
TWO = {"id": "two", "nodes": [{"id": "s", "uses": "tag"}, {"id": "p", "uses": "tag"}, {"id": "q", "uses": "slow"}],
       "edges": [{"source": "s", "target": "p"}, {"source": "s", "target": "q"}]}


def test_a_first_delivery_is_claimed_by_the_commit_that_completes_it(redis_url):
    seen: list[Any] = []

    def tag(ctx):
        seen.append(ctx.input)
        return "done"

    async def go(first: bool) -> tuple[int, Any, Any]:
        a = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": tag}, queue_name=f"defer-1-{first}")
        a.create_worker()
        run_id, scheduled = await a.engine.start_run("one", {"n": 1})
        commits = count_commits(a)
        handled = await a.engine.handle(scheduled[0][1], first=first)
        view = await a.inspect(run_id)
        await a.close()
        await a.redis.aclose()
        return commits[0], handled, view

    deferred, handled, view = asyncio.run(go(True))
    assert deferred == 1 and handled.outcome.value == "ok" and not handled.listed
    assert view.status == "completed" and seen == [{"n": 1}]
    attempt = next(e for e in view.timeline if e["node_id"] == "x")
    assert attempt["outcome"] == "completed" and attempt["worker"] and attempt["started_at"]
    claimed_first, _, view = asyncio.run(go(False))  # a redelivered job: claim, then commit
    assert claimed_first == 2 and view.status == "completed"


def _run_a_slow_first_delivery(redis_url: str, queue: str, flaky: bool = False) -> tuple[list[str], int, Any, Any]:
    """A node that runs until released, on its job's first delivery: its statuses as ``inspect`` shows them until
    it shows running (10 s at most), the steps then listed under its worker, and the outcome. ``flaky``: the
    first commit after the run's start (the late claim's) meets a dropped connection."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    release = asyncio.Event()

    async def slow(ctx):
        await release.wait()
        return "late"

    async def go() -> tuple[list[str], int, Any, Any]:
        a = make_adapter(Redis.from_url(redis_url), [{**ONE, "nodes": [{"id": "x", "uses": "slow"}]}],
                         {"slow": slow}, queue_name=queue)
        a.create_worker()
        run_id, scheduled = await a.engine.start_run("one", {})
        apply, failed = a.store._apply, [not flaky]

        async def dropped_once(k: list[Any], args: list[Any]) -> Any:
            if not failed[0]:
                failed[0] = True
                raise RedisConnectionError("Connection closed by server.")
            return await apply(k, args)

        a.store._apply = dropped_once
        step = asyncio.ensure_future(a.engine.handle(scheduled[0][1], first=True))
        statuses: list[str] = []
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline and statuses[-1:] != ["running"]:
            await asyncio.sleep(LATE_CLAIM_S / 2)
            node = next(n for n in (await a.inspect(run_id, timeline=False)).nodes if n.node_id == "x")
            statuses.append(node.status)
        listed = await a.redis.hlen(keys.worker_steps_key(a.worker_id))
        release.set()
        handled = await step
        view = await a.inspect(run_id)
        await a.close()
        await a.redis.aclose()
        return statuses, listed, handled, view

    return asyncio.run(go())


def test_a_node_still_running_after_the_late_claim_delay_shows_running(redis_url):
    statuses, listed, handled, view = _run_a_slow_first_delivery(redis_url, "defer-late")
    assert statuses[-1] == "running"  # claimed while it ran, and listed under its worker like any claim
    assert listed == 1 and not handled.listed
    assert view.status == "completed" and [e["outcome"] for e in view.timeline if e["node_id"] == "x"] == ["completed"]


def test_a_job_run_unclaimed_by_one_worker_is_not_claimed_by_another_workers_commit(redis_url):
    """Worker B took q's queue job and runs its node unclaimed. Worker A's commit of p would claim q, a
    queued sibling, for A (and drop its job): the commit must find q's job locked and leave it, or q runs
    twice."""
    calls: list[str] = []
    gate = asyncio.Event()

    def tag(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    async def slow(ctx):
        calls.append(ctx.node_id)
        await gate.wait()
        return ctx.node_id

    async def go() -> tuple[Any, Any, Any]:
        a = make_adapter(Redis.from_url(redis_url), [TWO], {"tag": tag, "slow": slow}, queue_name="defer-2")
        b = make_adapter(Redis.from_url(redis_url), [TWO], {"tag": tag, "slow": slow}, queue_name="defer-2")
        for ad in (a, b):
            ad.create_worker()
            await ad.workers.beat(ad._fields())
        run_id, scheduled = await a.engine.start_run("two", {})
        s = await a.engine.handle(scheduled[0][1])  # s fires p (inline for A) and q (queued)
        assert s.inline is not None and s.inline.job.node_id == "p"
        q_job = Job(run_id, "q", 1)
        await b.queue.pool.psetex(f"arq:in-progress:{q_job.job_id}", 15000, b"1")  # B took q's job
        b_step = asyncio.ensure_future(b.engine.handle(q_job, first=True))  # runs q's node, unclaimed
        while "q" not in calls:
            await asyncio.sleep(0.001)
        p = await a.engine.handle(s.inline.job, s.inline)  # p's commit: q is queued, but B runs it
        gate.set()
        q = await b_step
        view = await a.inspect(run_id)
        for ad in (a, b):
            await ad.close()
            await ad.redis.aclose()
        return p, q, view

    p, q, view = asyncio.run(go())
    assert p.inline is None  # A's commit left q to B
    assert q.outcome.value == "ok" and view.status == "completed"
    assert sorted(calls) == ["p", "q", "s"]


def _run_with_a_stale_input(redis_url: str, queue: str, *, read_anew: bool) -> tuple[list[Any], Any, Any]:
    """One run of ONE with input {"v": 1}, its first delivery handled by a worker that remembers {"v": 0} as the
    node's input; ``read_anew=False`` keeps the deferred claim from reading the record and input anew."""
    seen: list[Any] = []

    def tag(ctx):
        seen.append(ctx.input)
        return ctx.input

    async def go() -> tuple[Any, Any]:
        a = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": tag}, queue_name=queue)
        a.create_worker()
        run_id, scheduled = await a.engine.start_run("one", {"v": 1})
        a.store._fields_of(run_id)[(STATE, "_inputs.x")] = b'{"v":0}'  # a stale memory of the input
        if not read_anew:
            preload = a.store.preload

            async def not_anew(run_id: str, wanted: Any, anew: Any = None) -> None:
                await preload(run_id, wanted)  # what it asks to read anew is taken from memory

            a.store.preload = not_anew
        handled = await a.engine.handle(scheduled[0][1], first=True)
        view = await a.inspect(run_id)
        await a.close()
        await a.redis.aclose()
        return handled, view

    return seen, *asyncio.run(go())


def test_a_deferred_claim_reads_the_record_and_input_anew(redis_url):
    """What this process remembers of the node's input is stale: the node is not run on it."""
    seen, handled, view = _run_with_a_stale_input(redis_url, "defer-fresh", read_anew=True)
    assert seen == [{"v": 1}]
    assert handled.outcome.value == "ok" and view.status == "completed" and view.outputs == {"x": {"v": 1}}


def test_a_node_that_ran_on_a_stale_input_runs_again_claimed(redis_url):
    """The safety net behind that read: a node that ran on an input its run does not hold (here a stale memory
    the read anew is kept from correcting) has its result dropped by the commit, which checks the input, and
    runs again, claimed first."""
    seen, handled, view = _run_with_a_stale_input(redis_url, "defer-stale", read_anew=False)
    assert seen == [{"v": 0}, {"v": 1}]
    assert handled.outcome.value == "ok" and view.status == "completed" and view.outputs == {"x": {"v": 1}}
    assert [e["outcome"] for e in view.timeline if e["node_id"] == "x"] == ["completed"]


def _reuse_a_run_id(redis_url: str, docs: list[dict], nodes: dict, queue: str, first: tuple[str, dict],
                    again: tuple[str, dict]) -> Any:
    """Worker W starts (so remembers) a run of ``first`` (blueprint, input); the run is cancelled elsewhere and
    expires, and a run of ``again`` starts under the same id. W is handed its start job's first delivery.
    Returns the new run's view."""

    async def go() -> Any:
        w = make_adapter(Redis.from_url(redis_url), docs, nodes, queue_name=queue)
        c = make_adapter(Redis.from_url(redis_url), docs, nodes, queue_name=queue)
        w.create_worker()
        run_id, _ = await w.engine.start_run(first[0], first[1], run_id=f"{queue}-id")
        await c.cancel(run_id)  # (W does not see it)
        async for k in c.redis.scan_iter(match=f"*{run_id}*"):  # it expires
            await c.redis.delete(k)
        _, scheduled = await c.engine.start_run(again[0], again[1], run_id=run_id)
        await w.engine.handle(scheduled[0][1], first=True)
        view = await c.inspect(run_id)
        for ad in (w, c):
            await ad.close()
            await ad.redis.aclose()
        return view

    return asyncio.run(go())


def test_a_run_id_used_again_never_runs_a_node_on_the_earlier_runs_input(redis_url):
    """Worker W remembers run R; R is cancelled elsewhere and expires, and a new run starts under the same id.
    W is handed x's first job: x runs once, on the new run's input (from a review of this change)."""
    seen: list[Any] = []

    def tag(ctx):
        seen.append(ctx.input)
        return ctx.input

    view = _reuse_a_run_id(redis_url, [ONE], {"tag": tag}, "defer-reuse", ("one", {"secret": "run-1"}),
                           ("one", {"secret": "run-2"}))
    assert view.status == "completed" and view.outputs == {"x": {"secret": "run-2"}}
    assert seen == [{"secret": "run-2"}]


# s fires p and q; q's input is the context key "counter", which p (a sibling running at the same time) writes
CTX = {"id": "ctx", "nodes": [{"id": "s", "uses": "tag"}, {"id": "p", "uses": "writer"},
                              {"id": "q", "uses": "reader", "inputs": "counter"}],
       "edges": [{"source": "s", "target": "p"}, {"source": "s", "target": "q"}]}


def test_a_node_with_inputs_claims_first_so_a_sibling_changing_them_does_not_run_it_twice(redis_url):
    """q's input is a context key its sibling p writes while q runs: q's claim fixes its input (from a review of
    this change: run unclaimed, q ran a second time on the new value)."""
    calls: list[tuple[str, Any]] = []
    holder: dict[str, Any] = {}

    def tag(ctx):
        calls.append((ctx.node_id, ctx.input))
        return ctx.node_id

    async def writer(ctx):
        calls.append((ctx.node_id, ctx.input))
        await ctx.context.set("counter", 1)
        return "p"

    async def reader(ctx):
        calls.append((ctx.node_id, ctx.input))
        if len([c for c in calls if c[0] == "q"]) == 1:
            await holder["a"].engine.handle(holder["p"].job, holder["p"])  # p runs and commits on A meanwhile
        return "q"

    async def go() -> Any:
        nodes = {"tag": tag, "writer": writer, "reader": reader}
        a = make_adapter(Redis.from_url(redis_url), [CTX], nodes, queue_name="defer-ctx")
        b = make_adapter(Redis.from_url(redis_url), [CTX], nodes, queue_name="defer-ctx")
        for ad in (a, b):
            ad.create_worker()
            await ad.workers.beat(ad._fields())
        run_id, scheduled = await a.engine.start_run("ctx", {})
        s = await a.engine.handle(scheduled[0][1])
        assert s.inline is not None and s.inline.job.node_id == "p"
        holder["a"], holder["p"] = a, s.inline
        q_job = Job(run_id, "q", 1)
        await b.queue.pool.psetex(f"arq:in-progress:{q_job.job_id}", 15000, b"1")  # B's arq took q's job
        await b.engine.handle(q_job, first=True)
        view = await a.inspect(run_id)
        for ad in (a, b):
            await ad.close()
            await ad.redis.aclose()
        return view

    view = asyncio.run(go())
    assert view.status == "completed"
    assert [c for c in calls if c[0] == "q"] == [("q", None)]


def test_a_run_cancelled_while_its_start_job_waits_runs_nothing_on_a_first_delivery(redis_url):
    """The worker took the start job with the values the start wrote (its seed): the run was cancelled since.
    The record is read anew before the node would run unclaimed: nothing runs."""
    from flowcraft_cli.distributed.queue import deserialize

    ran: list[str] = []

    async def go() -> tuple[Any, Any]:
        client = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": lambda ctx: ran.append(ctx.node_id)},
                              queue_name="defer-cancel")
        worker = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": lambda ctx: ran.append(ctx.node_id)},
                              queue_name="defer-cancel")
        worker.create_worker()
        run_id, scheduled = await client.engine.start_run("one", {})
        job = scheduled[0][1]
        seed = deserialize(await client.redis.get(f"arq:job:{job.job_id}"))["seed"]
        assert await client.cancel(run_id)
        worker.store.seed(run_id, seed)  # as _run_picked does with the payload of a job a commit took
        handled = await worker.engine.handle(job, first=True)
        status = await worker.status(run_id)
        for ad in (client, worker):
            await ad.close()
            await ad.redis.aclose()
        return handled, status

    handled, status = asyncio.run(go())
    assert status is not None and status["status"] == "cancelled" and ran == []
    assert handled.scheduled == []


def test_a_job_taken_by_a_commit_comes_with_its_record_and_input_as_they_are_then(redis_url):
    """A commit that takes the queue's next job (OP_PICK) reads the job's node record and input in the same
    call: the step runs its node unclaimed without a read of its own, and one commit completes it. A run
    cancelled after its start job was queued shows cancelled there: its node does not run."""
    ran: list[Any] = []

    def tag(ctx):
        ran.append(ctx.input)
        return ctx.input

    async def go() -> tuple[Any, ...]:
        a = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": tag}, queue_name="defer-pick", concurrency=1)
        a.create_worker()
        first, scheduled = await a.engine.start_run("one", {"run": 1})
        job = scheduled[0][1]
        await a.queue.pool.psetex(f"arq:in-progress:{job.job_id}", 15000, b"1")  # arq handed it to this worker
        kept = await a.start_run("one", {"run": 2})
        commits = count_commits(a)
        took = (await a.engine.handle(job, first=True)).picked  # its commit takes the one job ready: kept's
        cancelled = await a.start_run("one", {"run": 3})
        await a.cancel(cancelled)
        before = commits[0]
        took_next = await a._run_picked(took) if took else None  # kept's commit takes the cancelled run's job
        kept_commits = commits[0] - before
        last = await a._run_picked(took_next) if took_next else None
        statuses = [(await a.status(r) or {}).get("status") for r in (first, kept, cancelled)]
        await a.close()
        await a.redis.aclose()
        return took, took_next, last, kept_commits, statuses, kept, cancelled

    took, took_next, last, kept_commits, statuses, kept, cancelled = asyncio.run(go())
    assert took is not None and took.job_id.startswith(kept) and took.tries == 1
    status, bp_id, version, record, node_input = took.fresh  # the run's, the node's record, its input
    assert (status, bp_id) == (b'"running"', b'"one"') and version
    assert b'"status":"queued"' in (record or b"") and node_input == b'{"run":2}'
    assert kept_commits == 1  # its node ran unclaimed, on what the pick read; one commit claimed and completed it
    assert took_next is not None and took_next.job_id.startswith(cancelled)
    assert took_next.fresh[0] == b'"cancelled"' and last is None
    assert ran == [{"run": 1}, {"run": 2}] and statuses == ["completed", "completed", "cancelled"]


PLANTED = {  # a queued job's payload "reread" (or its retry key) as nothing of this release writes it
    "number": [1], "empty-item": [[]], "null-item": [None], "one-string-item": [["just-a-key"]],
    "string-item": ["flowcraft:x"], "bool-key": [[True, "f"]], "non-hash-key": "QUEUE",
    "too-many": [["k", "f"]] * 17, "retry-key-not-a-count": "RETRY",
}


@pytest.mark.parametrize("shape", list(PLANTED))
def test_a_planted_job_does_not_fail_the_commit_that_takes_it(redis_url, shape):
    """The read anew and the delivery count run in the commit that takes the job, after its writes: nothing a
    job or a key holds may make it raise (from a review: a commit that failed there kept its writes while its
    worker handed its step back). The job taken is then read the usual way (its step claims first)."""
    ran: list[str] = []

    async def go() -> tuple[Any, Any, Any]:
        queue = f"defer-planted-{shape}"
        a = make_adapter(Redis.from_url(redis_url), [ONE], {"tag": lambda ctx: ran.append(ctx.run_id)},
                         queue_name=queue, concurrency=1)
        a.create_worker()
        first, scheduled = await a.engine.start_run("one", {})
        job = scheduled[0][1]
        await a.queue.pool.psetex(f"arq:in-progress:{job.job_id}", 15000, b"1")  # arq handed it to this worker
        second = await a.start_run("one", {})
        planted = Job(second, "x", 1).job_id
        if shape == "retry-key-not-a-count":
            await a.redis.set(f"arq:retry:{planted}", "many")
        else:
            data = json.loads(await a.redis.get(f"arq:job:{planted}"))
            data["reread"] = [[queue, "f"]] if PLANTED[shape] == "QUEUE" else PLANTED[shape]
            await a.redis.set(f"arq:job:{planted}", json.dumps(data), keepttl=True)
        handled = await a.engine.handle(job, first=True)  # its commit takes the planted job
        took = handled.picked
        if took is not None:
            await a._run_picked(took)
        statuses = [(await a.status(r) or {}).get("status") for r in (first, second)]
        await a.close()
        await a.redis.aclose()
        return handled, took, statuses

    handled, took, statuses = asyncio.run(go())
    assert handled.outcome.value == "ok" and took is not None
    assert took.tries == 2 if shape == "retry-key-not-a-count" else took.fresh == []
    assert statuses == ["completed", "completed"] and len(ran) == 2


def test_a_run_id_used_again_for_another_blueprint_never_runs_the_earlier_blueprints_node(redis_url):
    """As above, but the new run is of another blueprint with a node of the same id: the run's meta is read
    anew too, so the earlier blueprint's function never runs (from a second review of this change)."""
    calls: list[tuple[str, Any]] = []
    nodes = {"charge_card": lambda ctx: calls.append(("charge_card", ctx.input)),
             "send_mail": lambda ctx: calls.append(("send_mail", ctx.input))}
    card = {"id": "card", "nodes": [{"id": "x", "uses": "charge_card"}], "edges": []}
    mail = {"id": "mail", "nodes": [{"id": "x", "uses": "send_mail"}], "edges": []}
    view = _reuse_a_run_id(redis_url, [card, mail], nodes, "defer-reuse-bp", ("card", {"card": 1}),
                           ("mail", {"mail": 2}))
    assert view.status == "completed" and calls == [("send_mail", {"mail": 2})]


def test_a_late_claim_that_met_a_redis_error_is_taken_again_while_the_node_runs(redis_url):
    """The late claim's commit meets a dropped connection: it is tried again while the node runs, so the node
    still shows running and is listed under its worker (from a second review: it was never tried again)."""
    statuses, listed, _, view = _run_a_slow_first_delivery(redis_url, "defer-late-error", flaky=True)
    assert statuses[-1] == "running" and listed == 1
    assert view.status == "completed" and [e["outcome"] for e in view.timeline if e["node_id"] == "x"] == ["completed"]
