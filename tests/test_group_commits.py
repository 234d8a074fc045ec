"""A worker runs the quick steps of a chain after a step ahead of its commit and commits them together
(``engine.ahead``): one transaction for a group of nodes, not one per node. What the commits one by one gave
is kept: a node ahead sees what the nodes before it wrote, a node still running at ``AHEAD_S`` or failing is
claimed by the commit before it and goes on as an inline step, a run cancelled meanwhile keeps nothing of the
group, a redelivered or recovered step runs nothing ahead. Real Redis, real arq adapters; the worker deaths
are in test_leases."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from flowcraft_cli import NodeResult
from flowcraft_cli.distributed import keys
from flowcraft_cli.engine import ahead
from flowcraft_cli.engine.builtins.function import idempotency_key
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
                    first: bool = True, clock: Any = None) -> tuple[int, Any, str]:
    """Start a run of ``doc`` and handle its start job (``first``: its first delivery) and the chain after it
    on one adapter: the commits that took, the run's view, its id."""
    async def go() -> tuple[int, Any, str]:
        a = make_adapter(Redis.from_url(redis_url), [doc], nodes, queue_name=queue)
        a.create_worker()
        if clock is not None:
            a.engine.clock = clock
        run_id, scheduled = await a.engine.start_run(doc["id"], {})
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
