"""The one-round-trip commit (``distributed.commit``): a transaction decides on values it read (from Redis or
from its process's cache), and its commit checks every one of them before applying anything. Driven against a
real Redis, with two adapters standing for two worker processes (each has its own cache)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from flowcraft_cli.distributed import keys
from flowcraft_cli.distributed.commit import APPLY, OP_HDEL, OP_HSET, Commit
from flowcraft_cli.distributed.queue import deserialize
from flowcraft_cli.engine import StepOutcome
from flowcraft_cli.jobs import Job
from tests.harness import make_adapter

CHAIN = """
id: chain
nodes:
  - {id: a, uses: tag}
  - {id: b, uses: tag}
edges:
  - {source: a, target: b}
"""
FAN = """
id: fan
nodes:
  - {id: s, uses: tag}
  - {id: x, uses: tag}
  - {id: y, uses: tag}
  - {id: z, uses: tag}
  - {id: j, uses: tag}
edges:
  - {source: s, target: x}
  - {source: s, target: y}
  - {source: s, target: z}
  - {source: x, target: j}
  - {source: y, target: j}
  - {source: z, target: j}
"""


def _two_workers(redis_url: str, doc: str, queue: str, tag) -> tuple:
    """Two adapters, standing for two worker processes: each has its own connection and its own cache."""
    ra, rb = Redis.from_url(redis_url), Redis.from_url(redis_url)
    return (make_adapter(ra, [doc], {"tag": tag}, queue_name=queue),
            make_adapter(rb, [doc], {"tag": tag}, queue_name=queue))


async def _close(*adapters) -> None:
    for adapter in adapters:
        await adapter.close()
        await adapter.redis.aclose()


@pytest.mark.parametrize("meanwhile", ["cancel", "redeliver"])
def test_a_stale_cache_is_refused_and_decided_again(redis_url, meanwhile):
    """Worker A remembers the run as it started it. Meanwhile B cancels the run, or runs a's step (and A is
    handed a's job again). A's claim decides on its stale memory, the commit is refused (what it read
    changed), and A decides again on the values the refusal sent back: the node does not run (again)."""
    calls: list[str] = []

    def tag(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    async def go():
        a, b = _two_workers(redis_url, CHAIN, f"commit-{meanwhile}", tag)
        run_id, scheduled = await a.engine.start_run("chain", {})  # A's cache now holds the run's fields
        if meanwhile == "cancel":
            assert await b.cancel(run_id)
        else:
            await b.engine.handle(scheduled[0][1])
        handled = await a.engine.handle(scheduled[0][1])
        conflicts = a.store.conflicts
        view = await b.inspect(run_id)
        await _close(a, b)
        return handled, conflicts, view

    handled, conflicts, view = asyncio.run(go())
    assert handled.scheduled == []
    assert conflicts >= 1  # the stale read was caught by the commit's check, not by a read before it
    if meanwhile == "cancel":
        assert calls == [] and view.status == "cancelled"
    else:
        assert calls == ["a"] and handled.outcome == StepOutcome.STALE
        assert {n.node_id: n.status for n in view.nodes} == {"a": "completed", "b": "queued"}


def test_two_processes_on_one_fan_in_count_every_arrival(redis_url):
    """x, y, z finish on two workers whose caches each miss the other's writes: every commit that decided on
    a stale join count is refused and decided again, so j fires once, with all three inputs."""
    calls: list[str] = []

    def tag(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    async def go():
        a, b = _two_workers(redis_url, FAN, "commit-q2", tag)
        run_id, scheduled = await a.engine.start_run("fan", {})
        s = await a.engine.handle(scheduled[0][1])
        jobs = {job.node_id: job for _, job in s.scheduled}
        # each worker reads the join count into its cache before the other commits
        await b.engine.handle(jobs["x"])
        await a.engine.handle(jobs["y"])
        await b.engine.handle(jobs["z"])
        view = await a.inspect(run_id)
        js = [job for job in (await a.engine.expected_jobs(run_id))[0] if job.node_id == "j"]
        handled_j = await b.engine.handle(js[0]) if js else None
        view = await a.inspect(run_id)
        conflicts = a.store.conflicts + b.store.conflicts
        await _close(a, b)
        return view, handled_j, conflicts

    view, handled_j, conflicts = asyncio.run(go())
    assert handled_j is not None
    assert view.status == "completed", view.reason
    assert sorted(calls) == ["j", "s", "x", "y", "z"]
    assert view.context["_inputs.j"] == {"x": "x", "y": "y", "z": "z"}
    assert conflicts >= 1


def test_a_big_program_commits_whole_or_not_at_all(redis_url):
    """More fields than one Lua unpack() takes (the script slices them), and a refused commit writes none."""

    async def go():
        r = Redis.from_url(redis_url)
        apply = r.register_script(APPLY)
        key = "flowcraft:test:big"
        await r.delete(key)
        p = Commit()
        p.check(key, "guard", None)
        p.op(OP_HSET, key, *(x for i in range(5000) for x in (f"f{i}", str(i))))
        p.op(OP_HDEL, key, *(f"f{i}" for i in range(2500, 5000)))
        first = await apply(keys=p.keys, args=p.argv())
        size, tail = await r.hlen(key), await r.hmget(key, "f2499", "f2500")
        # a second program that read "guard" as absent, but it is set now: refused, nothing written
        await r.hset(key, "guard", "1")
        q = Commit()
        q.check(key, "guard", None)
        q.check(key, "f7", b"7")
        q.op(OP_HSET, key, "f0", "changed")
        second = await apply(keys=q.keys, args=q.argv())
        f0 = await r.hget(key, "f0")
        conflicts = q.values(second)
        await r.delete(key)
        await r.aclose()
        return first, size, tail, second, f0, conflicts

    first, size, tail, second, f0, conflicts = asyncio.run(go())
    assert first == [1, None, None, 0, 0] and size == 2500 and tail == [b"2499", None]
    assert second[0] == 0 and f0 == b"0"
    assert conflicts == [("flowcraft:test:big", "guard", b"1"), ("flowcraft:test:big", "f7", b"7")]


def test_a_commit_queues_its_jobs_in_the_same_call(redis_url):
    """The jobs a commit decides are on arq's queue when the commit returns: nothing waits in the outbox for
    the worker to queue it (a crash there once left the run to the reconciler)."""

    async def go():
        r = Redis.from_url(redis_url)
        a = make_adapter(r, [CHAIN], {"tag": lambda ctx: ctx.node_id}, queue_name="commit-q3")
        run_id, scheduled = await a.engine.start_run("chain", {})
        queued_after_start = await a.queue.state_of([job.job_id for _, job in scheduled])
        outbox = await r.hlen(keys.kind_key("outbox", run_id))
        handled = await a.engine.handle(scheduled[0][1])  # a's step; not flushed by anyone
        b_job = Job(run_id, "b", 1)
        queued_b = await a.queue.state_of([b_job.job_id])
        await a.close()
        await r.aclose()
        return queued_after_start, outbox, handled, queued_b, b_job

    queued_after_start, outbox, handled, queued_b, b_job = asyncio.run(go())
    assert list(queued_after_start.values()) == ["queued"] and outbox == 0
    assert [job.job_id for _, job in handled.scheduled] == [b_job.job_id]
    assert queued_b == {b_job.job_id: "queued"}


def test_a_program_holding_bytes_that_are_not_utf8_still_commits(redis_url):
    """Redis's cmsgpack has no binary type: a program with a value that is not UTF-8 (a corrupt field read
    as it is) goes as plain ARGV instead of one msgpack blob, and checks the exact bytes."""

    async def go():
        r = Redis.from_url(redis_url)
        apply = r.register_script(APPLY)
        key = "flowcraft:test:raw"
        await r.delete(key)
        await r.hset(key, "odd", b"\xff\xfe")
        p = Commit()
        p.check(key, "odd", b"\xff\xfe")
        p.op(OP_HSET, key, "ok", "1")
        sent = p.argv()
        reply = await apply(keys=p.keys, args=sent)
        got = await r.hget(key, "ok")
        await r.delete(key)
        await r.aclose()
        return sent, reply, got

    sent, reply, got = asyncio.run(go())
    assert sent[0] == "flat" and reply == [1, None, None, 0, 0] and got == b"1"


def test_a_worker_does_not_keep_large_values_in_memory(redis_url):
    """A worker remembers a run's fields between its steps, but not a large value (a big node output): 2,000
    runs remembered must not hold gigabytes. The run still sees the value whole."""
    big = "x" * 100_000
    seen: list[int] = []
    holder: list = []

    def tag(ctx):
        if ctx.node_id == "a":
            return big
        remembered = holder[0].store._cache.get(ctx.run_id, {})  # while b runs, a's output is committed
        seen.append(max(len(v) for v in remembered.values() if v is not None))
        return len(ctx.input)

    async def go():
        r = Redis.from_url(redis_url)
        a = make_adapter(r, [CHAIN], {"tag": tag}, queue_name="commit-q5")
        holder.append(a)
        run_id = await a.start_run("chain", {})
        await a.start(burst=True)
        view = await a.inspect(run_id)
        await _close(a)
        return view

    view = asyncio.run(go())
    assert view.status == "completed" and view.outputs["b"] == 100_000
    assert seen and seen[0] <= 64 * 1024


def test_a_refused_commit_still_writes_what_its_retry_owes(redis_url):
    """Writes a process makes only now and then (the run's progress mark, at most once a second per run) are
    marked done when the program is built. A program that Redis refuses did not write them: the decision made
    again must, or a run whose commit once met a conflict looks idle to the reconciler."""

    async def go():
        r = Redis.from_url(redis_url)
        a = make_adapter(r, [CHAIN], {"tag": lambda ctx: ctx.node_id}, queue_name="commit-marks")
        # a run started a few seconds ago: the progress mark its start wrote is due again at its first step
        real_clock = a.engine.clock
        a.engine.clock = lambda: real_clock() - 5_000
        run_id, scheduled = await a.engine.start_run("chain", {})  # a's cache holds the run's meta now
        a.engine.clock = real_clock
        progress = keys.progress_key(run_id)
        await r.set(progress, "0", px=600_000)
        # another process rewrites a field a's claim reads (same JSON, other bytes): a's commit is refused
        meta = keys.kind_key("run", run_id)
        await r.hset(meta, "awaiting_nodes", "[ ]")
        handled = await a.engine.handle(scheduled[0][1])
        mark, conflicts = await r.get(progress), a.store.conflicts
        await a.close()
        await r.aclose()
        return handled, mark, conflicts

    handled, mark, conflicts = asyncio.run(go())
    assert conflicts >= 1 and handled.outcome == StepOutcome.OK
    assert mark is not None and mark != b"0"


def _count_reads(adapter) -> list[tuple]:
    """Every HMGET pipeline ``adapter``'s store sends (the read of a run's fields before a step decides)."""
    sent: list[tuple] = []
    held = adapter.store._held
    real = held.pipeline

    async def pipeline(commands):
        sent.extend(c for c in commands if c[0] == "HMGET")
        return await real(commands)

    held.pipeline = pipeline
    return sent


def test_a_start_job_carries_what_its_claim_reads(redis_url):
    """A run's start jobs carry the fields their claim reads (the meta, the node's record, its input), as the
    start wrote them, beside arq's own keys in the payload, and for a small blueprint every node record (the
    others absent) and the run's count of events: a worker that takes one in a commit reads nothing before its
    step (the node's record and input, which a first delivery reads anew before running its node unclaimed,
    came back with that commit: Engine.defer_claims), and its commit sends back nothing for the run's next
    commits to read. arq hands the job to the step without them (a worker of an earlier release would reject an
    argument it does not know), so the one run arq hands over is read as before."""
    ran: list[str] = []

    def tag(ctx):
        ran.append(ctx.node_id)
        return ctx.node_id

    async def go():
        client = make_adapter(Redis.from_url(redis_url), [CHAIN], {"tag": tag}, queue_name="seed-q")
        worker = make_adapter(Redis.from_url(redis_url), [CHAIN], {"tag": tag}, queue_name="seed-q",
                              concurrency=1)
        reads = _count_reads(worker)
        run_ids = [await client.start_run("chain", {"x": i}) for i in range(3)]
        payload = deserialize(await client.redis.get(f"arq:job:{run_ids[0]}|a|1|exec|1"))
        await worker.start(burst=True)  # arq hands one start job over; each run's end takes the next
        views = [await worker.inspect(r) for r in run_ids]
        await _close(client, worker)
        return views, reads, payload, run_ids

    views, reads, payload, run_ids = asyncio.run(go())
    assert all(v.status == "completed" for v in views) and sorted(ran) == ["a"] * 3 + ["b"] * 3
    assert payload["k"] == {} and payload["seed"]["nodes"]["a"]  # not an argument of the step
    assert payload["seed"]["nodes"]["b"] is None and payload["seed"]["run"]["events"] == "1"
    read_runs = {r for r in run_ids for c in reads if c[1].endswith(r)}
    assert len(read_runs) == 1, reads  # the run arq handed over; the two taken by commits read nothing


def test_a_seed_gone_stale_only_makes_the_claim_decide_again(redis_url):
    """The run is cancelled after its start job was queued: the worker's claim decides on the seed (a
    running run), its commit is refused, and deciding again on what Redis holds it runs nothing."""
    ran: list[str] = []

    async def go():
        client, worker = _two_workers(redis_url, CHAIN, "seed-q2", lambda ctx: ran.append(ctx.node_id))
        run_id, scheduled = await client.engine.start_run("chain", {})
        job = scheduled[0][1]
        seed = deserialize(await client.redis.get(f"arq:job:{job.job_id}"))["seed"]
        assert await client.cancel(run_id)
        worker.store.seed(run_id, seed)  # as _run_picked does with the payload of a job a commit took
        handled = await worker.engine.handle(job)
        status, conflicts = await worker.status(run_id), worker.store.conflicts
        await _close(client, worker)
        return handled, status, conflicts

    handled, status, conflicts = asyncio.run(go())
    assert status["status"] == "cancelled" and ran == []
    assert conflicts >= 1 and handled.scheduled == []


def test_a_large_input_is_not_copied_into_the_start_job(redis_url):
    """A start job carries only small values: a large run input is read by the worker's claim."""
    async def go():
        client, worker = _two_workers(redis_url, CHAIN, "seed-q4", lambda ctx: ctx.input)
        reads = _count_reads(worker)
        big = {"blob": "x" * 20_000}
        run_id = await client.start_run("chain", big)
        payload = await client.redis.get(f"arq:job:{run_id}|a|1|exec|1")
        await worker.start(burst=True)
        view = await worker.inspect(run_id)
        await _close(client, worker)
        return view, reads, payload

    view, reads, payload = asyncio.run(go())
    assert view.status == "completed" and view.outputs["b"] == {"blob": "x" * 20_000}
    assert payload is not None and len(payload) < 5_000
    assert [c for c in reads if c[2:] == ("_inputs.a",)]  # read by the claim, not carried


OTHER = """
id: other
nodes:
  - {id: a, uses: other}
"""


def test_a_run_id_used_again_is_run_on_its_own_blueprint(redis_url):
    """Review finding: a worker chose a step's blueprint on what it remembered of the run. A run id used
    again after the first run expired (or a start job that outlived its run, carrying its values) made it run
    the new run's node with the old run's blueprint: the commits' checks refused the old values, but the step
    decided again with the blueprint it had. A transaction that finds the run of another blueprint now ends
    the step, which is handled again on fresh values."""
    ran: list[str] = []
    nodes = {"tag": lambda ctx: ran.append(f"tag:{ctx.node_id}") or "t",
             "other": lambda ctx: ran.append(f"other:{ctx.node_id}") or "o"}

    async def go():
        client = make_adapter(Redis.from_url(redis_url), [CHAIN, OTHER], nodes, queue_name="reuse-q", ttl_s=1)
        worker = make_adapter(Redis.from_url(redis_url), [CHAIN, OTHER], nodes, queue_name="reuse-q")
        run_id, scheduled = await client.engine.start_run("chain", {}, run_id="reused")
        await worker.engine.handle(scheduled[0][1])  # the worker remembers the run, of blueprint chain
        assert await client.cancel(run_id)
        deadline = asyncio.get_running_loop().time() + 10
        while await client.status(run_id) is not None:  # its keys expire (ttl 1 s)
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        ran.clear()
        _, again = await client.engine.start_run("other", {}, run_id=run_id)
        handled = await worker.engine.handle(again[0][1])
        view = await worker.inspect(run_id)
        await _close(client, worker)
        return handled, view

    handled, view = asyncio.run(go())
    assert ran == ["other:a"]
    assert view.status == "completed" and [n.node_id for n in view.nodes] == ["a"]


@pytest.mark.parametrize("seed", [{"run": {"status": "not json"}}, {"run": {"status": '"bogus"'}},
                                  {"run": {"pending": '"x"'}}, {"nodes": {"a": '{"status": 5}'}},
                                  {"joins": {}}, {"run": {"status": 7}}, "not a dict"])
def test_a_seed_with_anything_wrong_in_it_is_ignored_whole(redis_url, seed):
    """Review finding: a seed of strings that are not the run's values was remembered as read, and the step
    raised on it (arq recorded the job failed, not retried); so did every later job of the run on that worker."""
    async def go():
        worker = make_adapter(Redis.from_url(redis_url), [CHAIN], {"tag": lambda ctx: ctx.node_id},
                              queue_name="seed-bad")
        run_id, scheduled = await worker.engine.start_run("chain", {})
        worker.store.forget(run_id)  # as a worker that never saw the run
        worker.store.seed(run_id, seed)
        handled = await worker.engine.handle(scheduled[0][1])
        view = await worker.inspect(run_id)
        await _close(worker)
        return handled, view

    handled, view = asyncio.run(go())
    assert handled.outcome == StepOutcome.OK
    assert {n.node_id: n.status for n in view.nodes}["a"] == "completed"


def test_a_claim_decided_again_forgets_that_it_first_found_the_node_held(redis_url):
    """Review finding (older than the seeds): a claim that first decided on a stale memory of the node (running
    under another live worker) set "held elsewhere", and kept it when, decided again on fresh values, it took
    the claim and ran the step: the worker then reported the step as another's and dropped what it decided
    (its successor stayed claimed, unrun, until this worker's heartbeat recovered it)."""
    from flowcraft_cli.engine.state import JobKind, NodeRecord, NodeStatus
    from flowcraft_cli.store import dumps

    ran: list[str] = []

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [CHAIN], {"tag": lambda ctx: ran.append(ctx.node_id)},
                         queue_name="held-q")
        run_id, scheduled = await a.engine.start_run("chain", {})
        job = scheduled[0][1]
        # a's memory: node a running under worker "b", alive and holding it; in Redis it is still queued
        stale = NodeRecord(status=NodeStatus.RUNNING, seq=1, attempt=1, phase=JobKind.EXEC, token="t0", worker="b",
                           job=job.job_id).to_json()
        a.store._fields_of(run_id)[("nodes", "a")] = dumps(stale).encode()
        real_held = a.engine.claim_is_held

        async def held(holder):
            return holder.worker == "b" or await real_held(holder)

        a.engine.claim_is_held = held
        handled = await a.engine.handle(job)
        await _close(a)
        return handled

    handled = asyncio.run(go())
    assert ran == ["a"]
    assert handled.outcome == StepOutcome.OK and [j.node_id for _, j in handled.scheduled] == ["b"]


def test_a_runs_events_are_numbered_fields_of_its_hash_and_capped(redis_url, redis_sync, monkeypatch):
    """Each event is a field ``e:<n>`` of the run's hash, numbered by the run's ``events`` count: read in
    order, and only the last EVENT_CAP kept. Two steps adding events at once both land (the count is checked
    by the commit, so the second one is decided again on the first one's count)."""
    from flowcraft_cli.distributed import redis_store

    monkeypatch.setattr(redis_store, "EVENT_CAP", 4)

    async def go():
        a, b = _two_workers(redis_url, FAN, "commit-events", lambda ctx: ctx.node_id)
        r = a.redis
        run_id, scheduled = await a.engine.start_run("fan", {})
        s = await a.engine.handle(scheduled[0][1])
        branches = [job for _, job in s.scheduled]
        # two processes finish two branches at once
        await asyncio.gather(a.engine.handle(branches[0]), b.engine.handle(branches[1]))
        for job in branches[2:]:
            await a.engine.handle(job)
        await a.start(burst=True)
        events = await a.store.read_events(run_id)
        fields = sorted(f for f in await r.hkeys(keys.kind_key("run", run_id)) if f.startswith(b"e:"))
        count = await r.hget(keys.kind_key("run", run_id), "events")
        await _close(a, b)
        return events, fields, count

    events, fields, count = asyncio.run(go())
    # run_started, 5 node_completed (s, x, y, z, j), run_finished: 7, of which the last 4 are kept
    assert int(count) == 7 and fields == [b"e:4", b"e:5", b"e:6", b"e:7"]
    assert [e["type"] for e in events] == ["node_completed"] * 3 + ["run_finished"]
    assert events[-2]["node"] == "j"


@pytest.mark.parametrize("planted", [b'"x"', b"{not json"])
def test_a_corrupt_count_of_events_loses_no_event_and_hides_no_run(redis_url, planted):
    """The run's count of events is not a number (planted, corrupt): the next events are numbered on from the
    last one there is, overwriting none, and ``inspect`` still shows the run (the count is the store's own,
    not a field of the run's meta)."""

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [CHAIN], {"tag": lambda ctx: ctx.node_id},
                         queue_name="commit-corrupt-count")
        run_id, scheduled = await a.engine.start_run("chain", {})
        s = await a.engine.handle(scheduled[0][1])  # a
        await a.redis.hset(keys.kind_key("run", run_id), "events", planted)
        a.store.forget(run_id)
        for _, job in s.scheduled:
            await a.engine.handle(job)  # b, and the run's end
        view = await a.inspect(run_id)
        events = await a.store.read_events(run_id)
        await _close(a)
        return view, events

    view, events = asyncio.run(go())
    assert view.status == "completed"
    assert [(e["type"], e.get("node")) for e in events] == [
        ("run_started", None), ("node_completed", "a"), ("node_completed", "b"), ("run_finished", None)]
