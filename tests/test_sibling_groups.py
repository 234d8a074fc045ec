"""In-process, a commit that claims a queued sibling of a fan-out claims several (``Engine.sibling_claims``), and
the step given them runs their nodes after its own and commits them together (``engine.ahead.succeed_siblings``):
a transaction per group of branches, not one per branch. What one commit a branch gave is kept: every branch
runs once, a failing branch is retried as its own step, branches that wait are spread over the free slots, and a
run cancelled meanwhile keeps nothing of a group. (Workers claim one at a time: test_taking_jobs.)"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from flowcraft_cli.runtime import FlowRuntime
from tests.harness import make_blueprints, make_registry


def fan(n: int, uses: str = "branch", config: dict[str, Any] | None = None) -> dict[str, Any]:
    nodes = [{"id": "s", "uses": "start"}, {"id": "j", "uses": "join"},
             *({"id": f"p{i}", "uses": uses, **({"config": config} if config else {})} for i in range(n))]
    edges = [e for i in range(n) for e in ({"source": "s", "target": f"p{i}"}, {"source": f"p{i}", "target": "j"})]
    return {"id": "fan", "nodes": nodes, "edges": edges}


def _runtime(doc: dict[str, Any], nodes: dict[str, Any], **kw: Any) -> tuple[FlowRuntime, list[int]]:
    registry = make_registry({"start": lambda ctx: "go", "join": _join, **nodes})
    runtime = FlowRuntime(make_blueprints([doc], registry), registry, **kw)
    commits = [0]

    def counted(txn: Any) -> None:
        commits[0] += 1

    runtime.store.on_commit = counted
    return runtime, commits


async def _join(ctx):
    return sorted(ctx.input) if isinstance(ctx.input, dict) else ctx.input


def test_a_fan_of_quick_branches_commits_a_group_of_them_at_once():
    calls: Counter[str] = Counter()

    async def branch(ctx):
        calls[ctx.node_id] += 1
        return ctx.node_id

    runtime, commits = _runtime(fan(40), {"branch": branch})
    result = asyncio.run(runtime.run("fan"))
    assert result.status == "completed", result.reason
    assert calls == Counter({f"p{i}": 1 for i in range(40)})
    assert result.outputs["j"] == sorted(f"p{i}" for i in range(40))
    # one by one: 44 (the start, s, each branch, j)
    assert commits[0] <= 12, commits[0]


def test_a_branch_that_fails_in_a_group_is_retried_as_its_own_step_and_nothing_runs_twice():
    calls: Counter[str] = Counter()

    async def branch(ctx):
        calls[ctx.node_id] += 1
        if ctx.node_id in ("p7", "p23") and ctx.attempt == 1:
            raise RuntimeError("flaky")
        await ctx.context.set(f"seen.{ctx.node_id}", ctx.attempt)
        return ctx.attempt

    runtime, _ = _runtime(fan(30, config={"maxRetries": 2}), {"branch": branch})
    result = asyncio.run(runtime.run("fan"))
    assert result.status == "completed", result.reason
    assert calls == Counter({f"p{i}": 2 if i in (7, 23) else 1 for i in range(30)})
    assert all(result.context[f"seen.p{i}"] == (2 if i in (7, 23) else 1) for i in range(30))
    flaky = next(n for n in result.view.nodes if n.node_id == "p7")
    assert flaky.status == "completed" and flaky.attempts == 2


def test_branches_that_wait_are_spread_over_the_free_slots_not_queued_in_one():
    """A commit after a node that waited claims one sibling, not several: with two slots, ten branches that
    each wait keep both slots busy (a slot holding eight claimed branches would run them one after another),
    and never more than two run at once (the runtime's runners)."""
    running = [0]
    overlapped = [0]
    most = [0]

    async def branch(ctx):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            if running[0] > 1:
                overlapped[0] += 1
            for _ in range(3):
                await asyncio.sleep(0.01)
                if running[0] > 1:
                    overlapped[0] += 1
                    break
        finally:
            running[0] -= 1
        return 1

    runtime, _ = _runtime(fan(10), {"branch": branch}, concurrency=2)
    result = asyncio.run(runtime.run("fan"))
    assert result.status == "completed", result.reason
    assert overlapped[0] >= 8, overlapped[0]
    assert most[0] == 2, most[0]


def test_a_run_cancelled_during_a_group_keeps_nothing_of_it_and_every_branch_runs_at_most_once():
    calls: Counter[str] = Counter()
    holder: dict[str, Any] = {}

    async def branch(ctx):
        calls[ctx.node_id] += 1
        if ctx.node_id == "p20":
            await holder["runtime"].cancel(ctx.run_id)
        return 1

    runtime, _ = _runtime(fan(40), {"branch": branch})
    holder["runtime"] = runtime
    result = asyncio.run(runtime.run("fan"))
    assert result.status == "cancelled", result.reason
    assert max(calls.values()) == 1 and calls["p20"] == 1
    # what ran after the cancel was not committed: no branch that ran after p20 in its group shows completed
    completed = {n.node_id for n in result.view.nodes if n.status == "completed"}
    assert "p20" not in completed and "j" not in completed


# ---- review findings


def _fan_with_successors(n: int) -> dict[str, Any]:
    """s -> p_i -> q_i -> j; q_i has ``inputs`` (no chain successor: p_i's step leads a group of siblings)."""
    nodes: list[dict[str, Any]] = [{"id": "s", "uses": "start"}, {"id": "j", "uses": "start"}]
    edges: list[dict[str, Any]] = []
    for i in range(n):
        nodes += [{"id": f"p{i}", "uses": "branch", "config": {"maxRetries": 2}},
                  {"id": f"q{i}", "uses": "after", "inputs": {"v": f"_outputs.p{i}"}}]
        edges += [{"source": "s", "target": f"p{i}"}, {"source": f"p{i}", "target": f"q{i}"},
                  {"source": f"q{i}", "target": "j"}]
    return {"id": "fan", "nodes": nodes, "edges": edges}


@pytest.mark.parametrize("how", ["fails", "still running at AHEAD_S"])
def test_a_sibling_handed_back_with_its_running_node_is_not_run_again(how):
    """A sibling that failed, or still ran at AHEAD_S, goes back with its running node; when the same commit
    also claimed a successor, that successor's step gets it among the steps claimed with it, and must leave it
    to its own step (which awaits the node) rather than run its node again."""
    calls: Counter[tuple[str, int]] = Counter()

    async def branch(ctx):
        calls[(ctx.node_id, ctx.attempt)] += 1
        if ctx.node_id == "p3" and ctx.attempt == 1:
            if how == "fails":
                raise RuntimeError("flaky")
            await asyncio.sleep(0.1)
        return ctx.node_id

    async def after(ctx):
        return ctx.input

    runtime, _ = _runtime(_fan_with_successors(6), {"branch": branch, "after": after})
    result = asyncio.run(runtime.run("fan"))
    assert result.status == "completed", result.reason
    assert calls[("p3", 1)] == 1, calls
    assert all(v == 1 for v in calls.values()), calls


def test_a_sibling_with_inputs_reads_them_after_the_siblings_before_it_ran():
    """A node with ``inputs`` has its input read from the context as it is claimed: it is not claimed together
    with siblings that run before it (they may write what it reads)."""
    n = 6
    doc = {"id": "fan",
           "nodes": [{"id": "s", "uses": "zero"}, {"id": "j", "uses": "join"},
                     *({"id": f"p{i}", "uses": "bump", "inputs": "counter"} for i in range(n))],
           "edges": [*({"source": "s", "target": f"p{i}"} for i in range(n)),
                     *({"source": f"p{i}", "target": "j"} for i in range(n))]}
    seen: list[tuple[str, Any, Any]] = []

    async def zero(ctx):
        await ctx.context.set("counter", 0)

    async def bump(ctx):
        seen.append((ctx.node_id, ctx.input, await ctx.context.get("counter")))
        await ctx.context.set("counter", ctx.input + 1)
        return ctx.input

    runtime, _ = _runtime(doc, {"zero": zero, "bump": bump}, concurrency=1)
    result = asyncio.run(runtime.run("fan"))
    assert result.status == "completed", result.reason
    assert all(inp == ctx for _, inp, ctx in seen), seen
    assert result.context["counter"] == n, result.context["counter"]


# ---- the runtime's runners


def test_a_retry_that_waits_out_its_delay_runs_while_other_steps_go_on():
    calls: Counter[str] = Counter()

    async def branch(ctx):
        calls[ctx.node_id] += 1
        if ctx.node_id == "p3" and ctx.attempt == 1:
            raise RuntimeError("once")
        return 1

    runtime, _ = _runtime(fan(8, config={"maxRetries": 2, "retryDelay": 20}), {"branch": branch}, concurrency=2)
    result = asyncio.run(runtime.run("fan"))
    assert result.status == "completed", result.reason
    assert calls == Counter({**{f"p{i}": 1 for i in range(8)}, "p3": 2})


def test_a_finished_runtime_is_freed_as_soon_as_it_is_dropped_without_the_cyclic_collector():
    """Nothing of the runtime refers back to it (the engine's hooks): a program that runs flows one after
    another frees each one's store at once, not at the next full collection (which then has it all to walk)."""
    import gc
    import weakref

    async def branch(ctx):
        return 1

    runtime, _ = _runtime(fan(5), {"branch": branch})
    runtime.store.on_commit = None
    assert asyncio.run(runtime.run("fan")).status == "completed"
    store = weakref.ref(runtime.store)
    gc.disable()
    try:
        del runtime
        assert store() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("wait_first", [False, True])
def test_a_node_that_cancels_its_own_run_ends_it_and_the_runtime_does_not_wait_on_itself(wait_first):
    """(found this stop) A call on the runtime made while it drives a run (a node cancelling its own run, a
    watchdog task) used to wait for every job of the runtime, the one that made the call included: a node that
    had waited before it cancelled hung the run for ever."""
    holder: dict[str, Any] = {}
    calls: Counter[str] = Counter()

    async def first(ctx):
        calls[ctx.node_id] += 1
        if wait_first:
            await asyncio.sleep(0.01)
        assert await holder["runtime"].cancel(ctx.run_id) is True
        return 1

    async def after(ctx):
        calls[ctx.node_id] += 1
        return 2

    doc = {"id": "c", "nodes": [{"id": "a", "uses": "first"}, {"id": "b", "uses": "after"}],
           "edges": [{"source": "a", "target": "b"}]}
    runtime, _ = _runtime(doc, {"first": first, "after": after})
    holder["runtime"] = runtime

    async def go():
        return await asyncio.wait_for(runtime.run("c"), 10)

    result = asyncio.run(go())
    assert result.status == "cancelled", result.reason
    assert calls == Counter({"a": 1})


def test_a_node_may_run_another_flow_on_its_own_runtime_and_gets_that_run_s_result():
    holder: dict[str, Any] = {}

    async def outer(ctx):
        await asyncio.sleep(0.005)
        inner = await holder["runtime"].run("inner", {"n": 2})
        return inner.outputs["x"]

    async def double(ctx):
        await asyncio.sleep(0.005)
        return ctx.input["n"] * 2

    docs = [{"id": "outer", "nodes": [{"id": "o", "uses": "outer"}], "edges": []},
            {"id": "inner", "nodes": [{"id": "x", "uses": "double"}], "edges": []}]
    registry = make_registry({"outer": outer, "double": double})
    runtime = FlowRuntime(make_blueprints(docs, registry), registry)
    holder["runtime"] = runtime

    async def go():
        return await asyncio.wait_for(runtime.run("outer"), 10)

    result = asyncio.run(go())
    assert result.status == "completed", result.reason
    assert result.outputs["o"] == 4


def test_two_runs_started_at_once_on_one_runtime_each_end_with_their_own_result():
    async def branch(ctx):
        await asyncio.sleep(0.002)
        return ctx.node_id

    runtime, _ = _runtime(fan(6), {"branch": branch}, concurrency=2)

    async def go():
        return await asyncio.wait_for(asyncio.gather(runtime.run("fan"), runtime.run("fan")), 10)

    first, second = asyncio.run(go())
    assert first.run_id != second.run_id
    for result in (first, second):
        assert result.status == "completed", result.reason
        assert result.outputs["j"] == sorted(f"p{i}" for i in range(6))
