"""A worker runs the quick steps of a chain after a step ahead of its commit and commits them together
(``engine.ahead``): one transaction for a group of nodes, not one per node. What the commits one by one gave
is kept: a node ahead sees what the nodes before it wrote, a node still running at ``AHEAD_S`` or failing is
claimed by the commit before it and goes on as an inline step, a run cancelled meanwhile keeps nothing of the
group, a redelivered or recovered step runs nothing ahead. Real Redis, real arq adapters; the worker deaths
are in test_leases."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from flowcraft_cli import NodeResult
from flowcraft_cli.distributed import keys
from flowcraft_cli.engine import ahead
from flowcraft_cli.engine.builtins.function import idempotency_key
from flowcraft_cli.engine.state import now_ms
from tests.harness import count_commits, make_adapter


def chain(name: str, uses: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    nodes = [{"id": f"n{i}", "uses": u, **((extra or {}).get(f"n{i}", {}))} for i, u in enumerate(uses)]
    edges = [{"source": f"n{i - 1}", "target": f"n{i}"} for i in range(1, len(uses))]
    return {"id": name, "nodes": nodes, "edges": edges}


async def _drive(a: Any, job: Any, first: bool = True) -> list[Any]:
    """Handle a queue job and the chain its commits claim for this worker, as ArqAdapter does."""
    handled = [await a.engine.handle(job, first=first)]
    while handled[-1].inline is not None:
        handled.append(await a.engine.handle(handled[-1].inline.job, handled[-1].inline))
    return handled


async def _close(a: Any) -> None:
    await a.close()
    await a.redis.aclose()


def _first_delivery(redis_url: str, doc: dict[str, Any], nodes: dict[str, Any], queue: str, *,
                    first: bool = True, clock: Any = None, holder: dict[str, Any] | None = None,
                    planted: dict[str, bytes] | None = None) -> tuple[int, Any, str]:
    """Start a run of ``doc`` and handle its start job (``first``: its first delivery) and the chain after it
    on one adapter (``holder["a"]``, for nodes that use it): the commits that took, the run's view, its id.
    ``planted``: context fields written raw into Redis first."""
    async def go() -> tuple[int, Any, str]:
        a = make_adapter(Redis.from_url(redis_url), [doc], nodes, queue_name=queue)
        if holder is not None:
            holder["a"] = a
        a.create_worker()
        if clock is not None:
            a.engine.clock = clock
        run_id, scheduled = await a.engine.start_run(doc["id"], {})
        for field_name, raw in (planted or {}).items():
            await a.redis.hset(f"workflow:state:{run_id}", field_name, raw)
        commits = count_commits(a)
        await _drive(a, scheduled[0][1], first=first)
        view = await a.inspect(run_id)
        await _close(a)
        return commits[0], view, run_id

    return asyncio.run(go())


def test_a_chain_of_quick_nodes_commits_once(redis_url):
    keys_seen: dict[str, str] = {}

    def tag(ctx):
        keys_seen[ctx.node_id] = ctx.idempotency_key
        return ctx.node_id

    commits, view, run_id = _first_delivery(redis_url, chain("c3", ["tag"] * 3), {"tag": tag}, "group-1")
    assert commits == 1 and view.status == "completed"
    assert view.outputs == {"n0": "n0", "n1": "n1", "n2": "n2"}
    assert keys_seen == {n: idempotency_key(run_id, n, 1) for n in ("n0", "n1", "n2")}
    attempts = {e["node_id"]: e for e in view.timeline}
    assert [attempts[n]["outcome"] for n in ("n0", "n1", "n2")] == ["completed"] * 3
    for before, after in (("n0", "n1"), ("n1", "n2")):  # each started once the one before it finished
        assert attempts[before]["started_at"] <= attempts[before]["finished_at"] <= attempts[after]["started_at"]
    # a redelivered job (its worker may have died in what it ran ahead) claims, commits alone, and the step its
    # commit claimed inline leads the rest
    commits, view, _ = _first_delivery(redis_url, chain("c3", ["tag"] * 3), {"tag": tag}, "group-1b", first=False)
    assert commits == 3 and view.status == "completed"


def test_a_node_run_ahead_sees_what_the_nodes_before_it_wrote(redis_url):
    seen: dict[str, Any] = {}

    async def first(ctx):
        await ctx.context.set("k", 1)
        await ctx.context.set("gone", 0)
        return {"x": [1]}

    async def second(ctx):
        await ctx.context.delete("gone")
        seen["k"] = await ctx.context.get("k")
        seen["out"] = await ctx.context.get("_outputs.n0")
        seen["input"] = ctx.input
        ctx.input["x"].append(2)  # its own copy: the output committed for n0 stays as n0 returned it
        return NodeResult(output="two")

    async def third(ctx):
        seen["all"] = {k: v for k, v in (await ctx.context.to_dict()).items() if not k.startswith("blueprint")}
        seen["has_gone"] = await ctx.context.has("gone")
        return "three"

    commits, view, _ = _first_delivery(redis_url, chain("c3", ["first", "second", "third"]),
                                       {"first": first, "second": second, "third": third}, "group-2")
    assert commits == 1 and view.status == "completed"
    assert seen["k"] == 1 and seen["out"] == {"x": [1]} and seen["input"] == {"x": [1, 2]}
    assert seen["has_gone"] is False
    assert {k: v for k, v in seen["all"].items() if not k.startswith("_inputs")} == \
        {"k": 1, "_outputs.n0": {"x": [1]}, "_outputs.n1": "two"}
    assert view.outputs["n0"] == {"x": [1]} and view.context["k"] == 1 and "gone" not in view.context


def test_a_condition_after_a_node_run_ahead_reads_the_groups_writes(redis_url):
    """n1 runs ahead of n0's commit; its edge to n2 is taken only if the key n0 wrote is there."""
    async def setter(ctx):
        await ctx.context.set("flag", True)

    doc = chain("cond", ["setter", "noop", "noop"])
    doc["edges"][1]["condition"] = "flag"

    _, view, _ = _first_delivery(redis_url, doc, {"setter": setter, "noop": lambda ctx: "ok"}, "group-3")
    assert view.status == "completed" and view.outputs.get("n2") == "ok"


def test_a_node_still_running_at_the_limit_is_claimed_by_the_commit_before_it(redis_url):
    release = asyncio.Event()
    runs: list[str] = []

    async def slow(ctx):
        runs.append(ctx.node_id)
        await release.wait()
        return "late"

    async def go() -> tuple[Any, Any, int, int]:
        a = make_adapter(Redis.from_url(redis_url), [chain("slow", ["noop", "slow", "noop"])],
                         {"noop": lambda ctx: ctx.node_id, "slow": slow}, queue_name="group-4")
        a.create_worker()
        run_id, scheduled = await a.engine.start_run("slow", {})
        commits = count_commits(a)
        handled = await a.engine.handle(scheduled[0][1], first=True)  # returns once n0's commit is in
        assert handled.inline is not None and handled.inline.running is not None
        during = await a.inspect(run_id, timeline=False)
        listed = await a.redis.hlen(keys.worker_steps_key(a.worker_id))
        release.set()
        rest = await a.engine.handle(handled.inline.job, handled.inline)
        assert rest.inline is None
        view = await a.inspect(run_id)
        await _close(a)
        return during, view, commits[0], listed

    during, view, commits, listed = asyncio.run(go())
    assert {n.node_id: n.status for n in during.nodes} == {"n0": "completed", "n1": "running", "n2": "pending"}
    assert listed == 1  # held under its worker like any claimed step
    assert runs == ["n1"] and commits == 2  # n0 alone; then n1, with n2 run ahead of it
    assert view.status == "completed" and view.outputs == {"n0": "n0", "n1": "late", "n2": "n2"}


def test_a_node_that_fails_ahead_is_retried_as_its_own_attempt(redis_url):
    tries: list[int] = []

    def flaky(ctx):
        tries.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first time")
        return "fine"

    doc = chain("flaky", ["noop", "flaky", "noop"], {"n1": {"config": {"maxRetries": 2}}})

    async def go() -> Any:
        a = make_adapter(Redis.from_url(redis_url), [doc], {"noop": lambda ctx: ctx.node_id, "flaky": flaky},
                         queue_name="group-5", worker_id="wk", concurrency=2)
        task = asyncio.ensure_future(a.start())
        run_id = await a.start_run("flaky", {})
        deadline = asyncio.get_running_loop().time() + 30
        while (status := await a.status(run_id)) is None:
            assert asyncio.get_running_loop().time() < deadline, "the run did not end"
            await asyncio.sleep(0.02)
        view = await a.inspect(run_id)
        a.stop()
        await task
        await _close(a)
        return status, view

    status, view = asyncio.run(go())
    assert status["status"] == "completed" and tries == [1, 2]
    outcomes = [(e["node_id"], e["attempt"], e["outcome"]) for e in view.timeline]
    assert outcomes == [("n0", 1, "completed"), ("n1", 1, "failed"), ("n1", 2, "completed"), ("n2", 1, "completed")]
    assert "first time" in next(e for e in view.timeline if e["outcome"] == "failed")["error"]


def test_a_run_cancelled_while_nodes_run_ahead_keeps_nothing_of_them(redis_url):
    """n1, run ahead of n0's commit, cancels the run: the group's commit finds the run ended and writes none of
    it. With ``slow``, n1 is still running when the group would commit, and its result is dropped once it
    ends; n2 never runs. Without, n2 may have started ahead before the commit (a group learns of a cancel at
    its commit): its result is dropped too."""
    def case(slow: bool) -> tuple[Any, list[str]]:
        ran: list[str] = []
        holder: dict[str, Any] = {}

        async def canceller(ctx):
            ran.append(ctx.node_id)
            await holder["a"].cancel(ctx.run_id)
            if slow:
                await asyncio.sleep(ahead.AHEAD_S * 3)
            return "after"

        async def go() -> Any:
            a = holder["a"] = make_adapter(Redis.from_url(redis_url), [chain("cx", ["noop", "canceller", "noop"])],
                                           {"noop": lambda ctx: ran.append(ctx.node_id),
                                            "canceller": canceller}, queue_name=f"group-6-{slow}")
            a.create_worker()
            run_id, scheduled = await a.engine.start_run("cx", {})
            handled = await _drive(a, scheduled[0][1])
            assert handled[-1].inline is None
            view = await a.inspect(run_id)
            await _close(a)
            return view

        return asyncio.run(go()), ran

    for slow in (False, True):
        view, ran = case(slow)
        assert view.status == "cancelled" and ran[:2] == ["n0", "n1"] and ran[2:] in ([], ["n2"])
        assert not slow or ran == ["n0", "n1"]
        assert not view.outputs


def test_a_group_holds_at_most_group_max_nodes(redis_url):
    n = ahead.GROUP_MAX + 4

    # time stands still: only the cap ends a group
    commits, view, _ = _first_delivery(redis_url, chain("long", ["noop"] * n), {"noop": lambda ctx: 1}, "group-7",
                                       clock=lambda: 1_700_000_000_000)
    assert commits == 2 and view.status == "completed" and len(view.outputs) == n


# ---- review: 1. an output that JSON changes (a tuple, int dict keys, NaN): the node run ahead is run again

@pytest.mark.parametrize("value", [(1, 2), {1: "a"}, float("nan")], ids=["tuple", "int-key", "nan"])
def test_an_output_json_changes_does_not_make_the_node_after_it_run_twice(redis_url, value):
    calls: list[str] = []

    def make(ctx):
        return value

    def count(ctx):
        calls.append(ctx.node_id)
        return "ok"

    _, view, _ = _first_delivery(redis_url, chain("tup", ["make", "count", "count"]), {"make": make, "count": count},
                                 f"rev-1-{type(value).__name__}")
    assert view.status == "completed"
    # committed one by one, n1 runs once and n2 once; here n1's result run ahead is dropped and n1 runs again
    assert calls == ["n1", "n2"], calls


# ---- review: 2. a worker told to stop (SIGTERM) while a group runs ahead: its nodes run again elsewhere

def test_a_worker_stopping_mid_group_does_not_run_the_nodes_ahead_twice(redis_url):
    runs: list[str] = []
    holder: dict[str, Any] = {}

    def noop(ctx):
        runs.append(ctx.node_id)
        return ctx.node_id

    def sigterm(ctx):  # the signal arrives while this node runs ahead of n0's commit
        runs.append(ctx.node_id)
        holder["a"].stop()
        return "m"

    doc = chain("stopping", ["noop", "sigterm", "noop"])
    nodes = {"noop": noop, "sigterm": sigterm}

    async def go() -> Any:
        a = holder["a"] = make_adapter(Redis.from_url(redis_url), [doc], nodes, queue_name="rev-2", worker_id="w1")
        a.create_worker()
        run_id, scheduled = await a.engine.start_run("stopping", {})
        await _drive(a, scheduled[0][1])  # the step in flight finishes (as _drain lets it)
        await _close(a)
        b = make_adapter(Redis.from_url(redis_url), [doc], nodes, queue_name="rev-2", worker_id="w2")
        await b.start(burst=True)  # another worker takes what was handed back
        view = await b.inspect(run_id)
        await _close(b)
        return view

    view = asyncio.run(go())
    assert view.status == "completed"
    # step by step: n0 commits, claims n1 inline, n1 runs once and commits (the step in flight is finished)
    assert runs.count("n1") == 1, runs


# ---- review: 3. a node that changes its input in place: its route sees the change only if it ended within AHEAD_S

@pytest.mark.parametrize("slow", [False, True], ids=["quick", "slow"])
def test_a_route_on_input_sees_the_same_input_however_long_the_node_ran_ahead(redis_url, slow):
    ran: list[str] = []

    def start(ctx):
        return {"go": False}

    async def mutate(ctx):
        ctx.input["go"] = True  # changes its own input in place, then (slow) runs past AHEAD_S
        if slow:
            await asyncio.sleep(ahead.AHEAD_S * 5)
        return "x"

    def last(ctx):
        ran.append(ctx.node_id)
        return "end"

    doc = chain("mut", ["start", "mutate", "last"])
    doc["edges"][1]["condition"] = "input.go"

    _, view, _ = _first_delivery(redis_url, doc, {"start": start, "mutate": mutate, "last": last}, f"rev-3-{slow}")
    assert view.status == "completed"
    # step by step (inline or queued), the route's `input` is the object the node changed: n2 runs, in both cases
    assert ran == ["n2"], {n.node_id: n.status for n in view.nodes}


# ---- review: 4. a value that is not JSON met by the route of a node run ahead: the run fails naming the wrong node

def test_an_undecodable_value_met_ahead_fails_the_run_naming_the_node_that_met_it(redis_url):
    doc = chain("undec", ["noop", "noop", "noop"])
    doc["edges"][1]["condition"] = "bad"

    _, view, _ = _first_delivery(redis_url, doc, {"noop": lambda ctx: ctx.node_id}, "rev-4",
                                 planted={"bad": b"\xff\xfe"})  # not JSON
    statuses = {n.node_id: n.status for n in view.nodes}
    assert view.status == "failed"
    # step by step: n0 completes, n1's step meets `bad` when it routes, and the run fails naming n1
    assert statuses["n0"] == "completed" and "'n1'" in (view.reason or ""), (statuses, view.reason)


# ---- review: 5. the time limit of a group is on the wall clock: stepped back (NTP), a slow node ahead runs unclaimed

def test_a_wall_clock_stepped_back_does_not_keep_a_slow_node_ahead_unclaimed(redis_url):
    offset = [0]
    seen: dict[str, Any] = {}
    holder: dict[str, Any] = {}

    def step_back(ctx):  # NTP steps the host's clock back an hour while this quick node runs ahead
        offset[0] -= 3_600_000
        return "q"

    async def slow(ctx):
        await asyncio.sleep(ahead.AHEAD_S * 10)
        view = await holder["a"].inspect(ctx.run_id, timeline=False)
        seen.update({n.node_id: n.status for n in view.nodes})
        await asyncio.sleep(ahead.AHEAD_S * 5)
        return "s"

    doc = chain("clk", ["noop", "step_back", "slow", "noop"])

    _, view, _ = _first_delivery(redis_url, doc, {"noop": lambda ctx: 1, "step_back": step_back, "slow": slow},
                                 "rev-5", holder=holder, clock=lambda: now_ms() + offset[0])
    assert view.status == "completed"
    # with a monotonic limit, slow is claimed AHEAD_S after n0 finished: inspect shows it running, n0/n1 completed
    assert seen.get("n2") == "running", seen


# ---- review: 6. a run cancelled before its group: a long node after it starts and runs to its end for nothing

def test_a_run_cancelled_before_a_group_does_not_run_a_long_node_to_its_end(redis_url):
    events: list[str] = []
    holder: dict[str, Any] = {}

    async def canceller(ctx):
        await holder["a"].cancel(ctx.run_id)  # the run is cancelled before n0 commits (another client, say)
        return "c"

    async def long(ctx):
        events.append("long started")
        await asyncio.sleep(1.0)
        events.append("long finished")  # its side effect, for a run cancelled before it started
        return "l"

    doc = chain("cxl", ["canceller", "long", "noop"])

    _, view, _ = _first_delivery(redis_url, doc, {"canceller": canceller, "long": long, "noop": lambda ctx: 1},
                                 "rev-6", holder=holder)
    assert view.status == "cancelled"
    # step by step, n0's commit finds the run cancelled and n1 never starts; here it starts (the documented
    # price), and is cancelled once the commit finds the run ended, rather than left to run its course
    assert "long finished" not in events, events  # cancelled once the commit did not claim it


def test_a_run_ended_elsewhere_while_a_step_ran_long_starts_nothing_after_it(redis_url):
    """n1 runs ahead of n0's commit and on past AHEAD_S (claimed by that commit, it goes on as an inline step);
    meanwhile another client cancels the run, which this worker's memory of the run does not know. Before n1
    leads, the run's status is read anew (its node ran long), and n2 never starts."""
    ran: list[str] = []
    doc = chain("ended", ["noop", "long", "noop"])

    async def long(ctx):
        ran.append(ctx.node_id)
        await asyncio.sleep(ahead.AHEAD_S * 2)  # n0's commit claims it meanwhile
        other = make_adapter(Redis.from_url(redis_url), [doc], {"long": long, "noop": lambda ctx: None},
                             queue_name="group-8")
        await other.cancel(ctx.run_id)
        await _close(other)
        await asyncio.sleep(ahead.AHEAD_S * 2)
        return "l"

    _, view, _ = _first_delivery(redis_url, doc, {"long": long, "noop": lambda ctx: ran.append(ctx.node_id)},
                                 "group-8")
    assert view.status == "cancelled" and ran == ["n0", "n1"]
