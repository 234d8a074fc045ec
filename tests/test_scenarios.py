"""CONTRACT §5 scenarios, run through every runtime (the ``flow`` fixture is parametrized)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from flowcraft_cli import NodeResult
from flowcraft_cli.errors import StateConflict

LINEAR = """
id: linear
nodes:
  - {id: a, uses: emit}
  - {id: b, uses: suffix}
edges:
  - {source: a, target: b}
"""


def emit(ctx):
    return "resultA"


async def suffix(ctx):
    return f"{ctx.input}_B"


def test_linear_data_flow(flow):
    r = flow.run(LINEAR, {"emit": emit, "suffix": suffix})
    assert r.status == "completed"
    assert r.outputs == {"a": "resultA", "b": "resultA_B"}
    assert r.context["_inputs.b"] == "resultA"
    assert r.context["blueprintId"] == "linear"


def test_start_node_gets_run_input_and_context_is_seeded(flow):
    doc = """
id: seed
nodes: [{id: a, uses: echo}]
edges: []
"""

    async def echo(ctx):
        return {"input": ctx.input, "ctx": await ctx.context.get("order")}

    r = flow.run(doc, {"echo": echo}, {"order": {"total": 5}})
    assert r.status == "completed"
    assert r.outputs["a"] == {"input": {"order": {"total": 5}}, "ctx": {"total": 5}}
    assert r.context["order"] == {"total": 5}


def test_node_returning_nothing_stores_null(flow):
    doc = """
id: none
nodes: [{id: a, uses: nothing}, {id: b, uses: show}]
edges: [{source: a, target: b}]
"""
    r = flow.run(doc, {"nothing": lambda ctx: None, "show": lambda ctx: repr(ctx.input)})
    assert r.status == "completed"
    assert "_outputs.a" in r.context and r.context["_outputs.a"] is None
    assert r.outputs["b"] == "None"


def test_inputs_mapping_and_dotted_paths(flow):
    doc = """
id: inputs
nodes:
  - {id: a, uses: deep}
  - id: b
    uses: echo
    inputs: {v: a.deep.v, raw: user, lit: _outputs.a, missing: a.nope.x}
edges: [{source: a, target: b}]
"""
    r = flow.run(doc, {"deep": lambda ctx: {"deep": {"v": 7}}, "echo": lambda ctx: ctx.input}, {"user": {"n": "x"}})
    assert r.outputs["b"] == {"v": 7, "raw": {"n": "x"}, "lit": {"deep": {"v": 7}}, "missing": None}


def test_transform_and_context_writes(flow):
    doc = """
id: transform
nodes:
  - {id: a, uses: writer}
  - {id: b, uses: echo}
  - {id: c, uses: reader}
edges:
  - {source: a, target: b, transform: "input.data * 2"}
  - {source: b, target: c}
"""

    async def writer(ctx):
        await ctx.context.set("shared_value", 42)
        return {"data": 21}

    def reader(ctx):
        return f"C received {ctx.context.get('shared_value')} and {ctx.input}"

    r = flow.run(doc, {"writer": writer, "echo": lambda ctx: ctx.input, "reader": reader})
    assert r.status == "completed"
    assert r.outputs["b"] == 42
    assert r.outputs["c"] == "C received 42 and 42"
    assert r.context["shared_value"] == 42


ROUTING = """
id: routing
nodes:
  - {id: a, uses: decide}
  - {id: b, uses: mark}
  - {id: c, uses: mark}
  - {id: d, uses: mark}
edges:
  - {source: a, target: b, action: known}
  - {source: a, target: c, action: other}
  - {source: a, target: d}
"""


def _skipped(r):
    return {n.node_id for n in r.view.nodes if n.status == "skipped"}


def test_action_routes_to_its_edges_only(flow):
    r = flow.run(ROUTING, {"decide": lambda ctx: NodeResult("x", "known"), "mark": lambda ctx: ctx.input})
    assert r.status == "completed"
    assert set(r.outputs) == {"a", "b"}
    assert _skipped(r) == {"c", "d"}


def test_unknown_action_falls_back_to_default_edges(flow):
    r = flow.run(ROUTING, {"decide": lambda ctx: NodeResult("x", "unknown"), "mark": lambda ctx: ctx.input})
    assert r.status == "completed"
    assert set(r.outputs) == {"a", "d"}
    assert _skipped(r) == {"b", "c"}


def test_no_action_and_only_action_edges_runs_nothing(flow):
    doc = """
id: only-actions
nodes: [{id: a, uses: plain}, {id: b, uses: plain}, {id: c, uses: plain}]
edges:
  - {source: a, target: b, action: x}
  - {source: a, target: c, action: y}
"""
    r = flow.run(doc, {"plain": lambda ctx: "v"})
    assert r.status == "completed"
    assert set(r.outputs) == {"a"}
    assert _skipped(r) == {"b", "c"}


def test_conditional_branch_skips_subtree_and_all_join_still_runs(flow):
    doc = """
id: cond-join
nodes:
  - {id: a, uses: ok}
  - {id: b, uses: tag}
  - {id: c, uses: tag}
  - {id: c2, uses: tag}
  - {id: d, uses: echo}
edges:
  - {source: a, target: b, condition: "result.output.ok"}
  - {source: a, target: c, condition: "result.output.nope"}
  - {source: c, target: c2}
  - {source: b, target: d}
  - {source: c2, target: d}
"""
    r = flow.run(doc, {"ok": lambda ctx: {"ok": True}, "tag": lambda ctx: "tag", "echo": lambda ctx: ctx.input})
    assert r.status == "completed"
    assert _skipped(r) == {"c", "c2"}
    assert r.outputs["d"] == {"b": "tag"}
    assert "_outputs.c" not in r.context


def test_condition_reads_context_keys_and_bare_names(flow):
    doc = """
id: route-total
nodes:
  - {id: route, uses: total}
  - {id: small, uses: tag}
  - {id: medium, uses: tag}
  - {id: large, uses: tag}
edges:
  - {source: route, target: small, condition: "total < 500"}
  - {source: route, target: medium, condition: "total >= 500 and total <= 2000"}
  - {source: route, target: large, condition: "outputs['route']['total'] > 2000"}
"""

    async def total(ctx):
        await ctx.context.set("total", 1665)
        return {"total": 1665}

    r = flow.run(doc, {"total": total, "tag": lambda ctx: ctx.node_id})
    assert set(r.outputs) == {"route", "medium"}


def test_condition_error_counts_as_false_and_is_recorded(flow):
    doc = """
id: cond-error
nodes: [{id: a, uses: v}, {id: b, uses: v}, {id: c, uses: v}]
edges:
  - {source: a, target: b, condition: "result.output.missing.deeper > 1"}
  - {source: a, target: c}
"""
    s = flow.session(doc, {"v": lambda ctx: {"x": 1}})
    r = s.run("cond-error")
    assert r.status == "completed"
    assert set(r.outputs) == {"a", "c"}
    assert any(e["type"] == "expression_error" for e in s.events(r.run_id))


def test_all_join_runs_once_after_all_predecessors(flow):
    calls = Counter()
    doc = """
id: fan-in
nodes:
  - {id: a, uses: v}
  - {id: b, uses: v}
  - {id: c, uses: v}
  - {id: d, uses: join}
edges:
  - {source: a, target: d}
  - {source: b, target: d}
  - {source: c, target: d}
"""

    def join(ctx):
        calls["d"] += 1
        return sorted(ctx.input)

    r = flow.run(doc, {"v": lambda ctx: ctx.node_id, "join": join})
    assert r.status == "completed"
    assert calls["d"] == 1
    assert r.outputs["d"] == ["a", "b", "c"]
    assert r.context["_inputs.d"] == {"a": "a", "b": "b", "c": "c"}


def test_any_join_runs_exactly_once(flow):
    calls = Counter()
    doc = """
id: any-join
nodes:
  - {id: s, uses: v}
  - {id: a, uses: v}
  - {id: b, uses: slow}
  - {id: x, uses: v}
  - {id: c, uses: join, config: {joinStrategy: any}}
edges:
  - {source: s, target: a}
  - {source: s, target: b}
  - {source: s, target: x}
  - {source: a, target: c}
  - {source: b, target: c}
  - {source: x, target: c}
"""

    def join(ctx):
        calls["c"] += 1
        return ctx.input

    def slow(ctx):
        time.sleep(0.3)
        return "b"

    r = flow.run(doc, {"v": lambda ctx: ctx.node_id, "slow": slow, "join": join})
    assert r.status == "completed"
    assert calls["c"] == 1
    assert r.outputs["c"] in ("a", "x")


def test_retries_call_node_max_retries_times_with_growing_delays(flow):
    seen: list[float] = []
    doc = """
id: retry
nodes:
  - {id: a, uses: flaky, config: {maxRetries: 3, retryDelay: 100}}
edges: []
"""

    def flaky(ctx):
        seen.append(time.monotonic())
        if ctx.attempt < 3:
            raise RuntimeError(f"boom {ctx.attempt}")
        return ctx.attempt

    s = flow.session(doc, {"flaky": flaky})
    r = s.run("retry")
    assert r.status == "completed"
    assert r.outputs["a"] == 3
    assert len(seen) == 3
    failures = [e for e in s.events(r.run_id) if e["type"] == "attempt_failed"]
    assert [e["retry_in_ms"] for e in failures] == [100, 200]  # retryDelay, doubling
    # and each next attempt was scheduled no earlier than that (engine timestamps, not the test's clock)
    starts = [t["started_at"] for t in r.view.timeline]
    assert all(starts[i + 1] >= failures[i]["ts"] + failures[i]["retry_in_ms"] for i in range(2))
    node = r.view.nodes[0]
    assert node.attempts == 3


def test_retries_exhausted_fail_the_run(flow):
    calls = Counter()
    doc = """
id: retry-fail
nodes:
  - {id: a, uses: bad, config: {maxRetries: 2}}
  - {id: b, uses: v}
edges: [{source: a, target: b}]
"""

    def bad(ctx):
        calls["a"] += 1
        raise ValueError("nope")

    r = flow.run(doc, {"bad": bad, "v": lambda ctx: 1})
    assert r.status == "failed"
    assert calls["a"] == 2
    assert "nope" in r.reason and "'a'" in r.reason
    assert "_outputs.b" not in r.context


def test_timeout_fails_the_attempt(flow):
    doc = """
id: timeout
nodes:
  - {id: a, uses: slow, config: {timeout: 400, maxRetries: 2}}
edges: []
"""
    calls = Counter()

    async def slow(ctx):
        import asyncio

        calls["a"] += 1
        if ctx.attempt == 1:
            await asyncio.sleep(5)  # far past the timeout; attempt 2 returns at once (the margin absorbs a busy CI box)
        return "fast enough"

    r = flow.run(doc, {"slow": slow})
    assert r.status == "completed"
    assert calls["a"] == 2
    assert r.outputs["a"] == "fast enough"


def test_fallback_output_reaches_failed_nodes_successors(flow):
    calls = Counter()
    doc = """
id: fallback
nodes:
  - {id: start, uses: v}
  - {id: failing, uses: bad, config: {maxRetries: 3, fallback: rescue}}
  - {id: rescue, uses: rescue}
  - {id: end, uses: end}
edges:
  - {source: start, target: failing}
  - {source: failing, target: end}
"""

    def bad(ctx):
        calls["failing"] += 1
        raise RuntimeError("down")

    def rescue(ctx):
        calls["rescue"] += 1
        return f"fallback-success({ctx.input})"

    r = flow.run(doc, {"v": lambda ctx: "in", "bad": bad, "rescue": rescue, "end": lambda ctx: f"end-with-{ctx.input}"})
    assert r.status == "completed"
    assert calls == {"failing": 3, "rescue": 1}
    assert r.outputs["end"] == "end-with-fallback-success(in)"
    assert r.outputs["failing"] == "fallback-success(in)"
    statuses = {n.node_id: n.status for n in r.view.nodes}
    assert statuses == {"start": "completed", "failing": "failed", "rescue": "completed", "end": "completed"}


def test_failure_in_one_branch_fails_run_and_no_later_node_starts(flow):
    started = []
    doc = """
id: branch-fail
nodes:
  - {id: s, uses: v}
  - {id: bad, uses: bad}
  - {id: slow, uses: slow}
  - {id: after, uses: v}
edges:
  - {source: s, target: bad}
  - {source: s, target: slow}
  - {source: slow, target: after}
"""

    def v(ctx):
        started.append(ctx.node_id)
        return 1

    def slow(ctx):
        started.append(ctx.node_id)
        time.sleep(0.3)
        return 2

    def bad(ctx):
        raise RuntimeError("kaput")

    r = flow.run(doc, {"v": v, "bad": bad, "slow": slow})
    assert r.status == "failed"
    assert "kaput" in r.reason
    assert "after" not in started


LOOP = """
id: loop
nodes:
  - {id: init, uses: init}
  - id: loop
    uses: loop-controller
    params: {condition: "counter < 3", maxIterations: 100}
  - {id: body, uses: inc}
  - {id: end, uses: end}
edges:
  - {source: init, target: loop}
  - {source: loop, target: body, action: continue}
  - {source: body, target: loop}
  - {source: loop, target: end, action: break}
"""


async def _init(ctx):
    await ctx.context.set("counter", 0)
    return 0


async def _inc(ctx):
    n = await ctx.context.get("counter") + 1
    await ctx.context.set("counter", n)
    return n


def test_loop_runs_n_iterations(flow):
    calls = Counter()

    async def inc(ctx):
        calls["body"] += 1
        return await _inc(ctx)

    r = flow.run(LOOP, {"init": _init, "inc": inc, "end": lambda ctx: "finished"})
    assert r.status == "completed"
    assert calls["body"] == 3
    assert r.context["counter"] == 3
    assert r.outputs["end"] == "finished"


def test_loop_stops_at_max_iterations(flow):
    doc = LOOP.replace('"counter < 3", maxIterations: 100', '"true", maxIterations: 5')
    r = flow.run(doc, {"init": _init, "inc": _inc, "end": lambda ctx: "finished"})
    assert r.status == "completed"
    assert r.context["counter"] == 5
    assert r.outputs["end"] == "finished"


def test_loop_with_zero_iterations_skips_body(flow):
    doc = LOOP.replace('"counter < 3"', '"counter < 0"')
    r = flow.run(doc, {"init": _init, "inc": _inc, "end": lambda ctx: "finished"})
    assert r.status == "completed"
    assert "body" in _skipped(r)
    assert r.outputs["end"] == "finished"


def test_loop_conditional_exit_edge_breaks_first(flow):
    doc = """
id: loop-exit
nodes:
  - {id: init, uses: init}
  - {id: loop, uses: loop-controller, params: {condition: "counter < 10"}}
  - {id: body, uses: inc}
  - {id: special, uses: tag}
  - {id: end, uses: tag}
edges:
  - {source: init, target: loop}
  - {source: loop, target: body, action: continue}
  - {source: body, target: loop}
  - {source: loop, target: special, condition: "counter == 5"}
  - {source: loop, target: end}
"""
    r = flow.run(doc, {"init": _init, "inc": _inc, "tag": lambda ctx: ctx.node_id})
    assert r.status == "completed"
    assert r.context["counter"] == 5
    assert set(r.outputs) >= {"special"} and "end" not in r.outputs


def test_batch_over_100_items_keeps_order(flow):
    doc = """
id: batch
nodes:
  - {id: prepare, uses: items}
  - {id: double, uses: batch, params: {worker: twice}}
  - {id: total, uses: total}
edges:
  - {source: prepare, target: double}
  - {source: double, target: total}
"""

    async def twice(ctx):
        import asyncio
        import random

        await asyncio.sleep(random.random() / 100)
        return ctx.input * 2

    r = flow.run(doc, {"items": lambda ctx: list(range(100)), "twice": twice, "total": lambda ctx: sum(ctx.input)})
    assert r.status == "completed"
    assert r.outputs["double"] == [i * 2 for i in range(100)]
    assert r.outputs["total"] == 9900


def test_batch_empty_and_non_list(flow):
    doc = """
id: batch2
nodes:
  - {id: prepare, uses: items}
  - {id: each, uses: batch, params: {worker: twice}}
edges:
  - {source: prepare, target: each}
"""
    r = flow.run(doc, {"items": lambda ctx: [], "twice": lambda ctx: ctx.input * 2})
    assert r.status == "completed" and r.outputs["each"] == []
    r = flow.run(doc, {"items": lambda ctx: "not a list", "twice": lambda ctx: ctx.input * 2})
    assert r.status == "failed" and "must be a list" in r.reason


def test_batch_item_failure_fails_run(flow):
    doc = """
id: batch3
nodes:
  - {id: prepare, uses: items}
  - {id: each, uses: batch, params: {worker: picky}}
  - {id: after, uses: items}
edges:
  - {source: prepare, target: each}
  - {source: each, target: after}
"""

    def picky(ctx):
        if ctx.input == 2:
            raise ValueError("no twos")
        return ctx.input

    r = flow.run(doc, {"items": lambda ctx: [1, 2, 3], "picky": picky})
    assert r.status == "failed"
    assert "no twos" in r.reason
    assert "_outputs.after" not in r.context


SUB = """
id: sub
nodes:
  - {id: process, uses: process, inputs: input}
edges: []
"""


def test_subflow_outputs_map_back(flow):
    parent = """
id: parent
nodes:
  - {id: input, uses: value}
  - id: call
    uses: subflow
    params: {blueprintId: sub, inputs: {input: input}, outputs: {subflow_output: process}}
  - {id: end, uses: end}
edges:
  - {source: input, target: call}
  - {source: call, target: end}
"""
    s = flow.session([parent, SUB], {"value": lambda ctx: {"value": "test"},
                                     "process": lambda ctx: "processed_" + ctx.input["value"],
                                     "end": lambda ctx: ctx.input["_outputs.process"]})
    r = s.run("parent")
    assert r.status == "completed", r.reason
    assert r.context["subflow_output"] == "processed_test"
    assert r.outputs["end"] == "processed_test"


def test_subflow_single_terminal_output_and_failure(flow):
    parent = """
id: parent2
nodes:
  - {id: start, uses: value}
  - {id: call, uses: subflow, params: {blueprintId: sub2}}
  - {id: end, uses: end}
edges:
  - {source: start, target: call}
  - {source: call, target: end}
"""
    sub = """
id: sub2
nodes: [{id: a, uses: subwork}]
edges: []
"""
    s = flow.session([parent, sub], {"value": lambda ctx: 20, "subwork": lambda ctx: ctx.input + 1,
                                     "end": lambda ctx: f"end-{ctx.input}"})
    r = s.run("parent2")
    assert r.status == "completed", r.reason
    assert r.outputs["call"] == 21 and r.outputs["end"] == "end-21"

    def bad(ctx):
        raise RuntimeError("inner boom")

    s = flow.session([parent, sub], {"value": lambda ctx: 20, "subwork": bad, "end": lambda ctx: 1})
    r = s.run("parent2")
    assert r.status == "failed" and "inner boom" in r.reason


def test_sleep_passes_input_through(flow):
    doc = """
id: sleepy
nodes:
  - {id: start, uses: v}
  - {id: pause, uses: sleep, params: {duration: 50}}
  - {id: double, uses: double}
edges:
  - {source: start, target: pause}
  - {source: pause, target: double}
"""
    r = flow.run(doc, {"v": lambda ctx: 42, "double": lambda ctx: ctx.input * 2})
    assert r.status == "completed"
    assert r.outputs["double"] == 84


def test_wait_awaits_and_resume_action_routes(flow):
    doc = """
id: review
nodes:
  - {id: start, uses: v}
  - {id: review, uses: wait}
  - {id: approve, uses: tag}
  - {id: reject, uses: tag}
edges:
  - {source: start, target: review}
  - {source: review, target: approve, action: approve}
  - {source: review, target: reject, action: reject}
"""
    s = flow.session(doc, {"v": lambda ctx: 1, "tag": lambda ctx: f"{ctx.node_id}:{ctx.input}"})
    r = s.run("review")
    assert r.status == "awaiting"
    assert r.view.awaiting_nodes == ["review"]
    r = s.resume(r.run_id, output={"ok": True}, action="approve")
    assert r.status == "completed"
    assert r.outputs["approve"] == "approve:{'ok': True}"
    assert "reject" not in r.outputs
    assert _skipped(r) == {"reject"}


def test_non_json_output_is_a_clear_node_error(flow):
    import datetime

    doc = """
id: nonjson
nodes: [{id: a, uses: dt, config: {maxRetries: 3}}]
edges: []
"""
    calls = Counter()

    def dt(ctx):
        calls["a"] += 1
        return {"when": datetime.datetime.now()}

    r = flow.run(doc, {"dt": dt})
    assert r.status == "failed"
    assert "'a'" in r.reason and "datetime" in r.reason
    assert calls["a"] == 1  # not retried: the same code returns the same type


def test_wait_inside_subflow_pauses_parent_and_resume_continues(flow):
    parent = """
id: main
nodes:
  - {id: main-start, uses: v42}
  - {id: subflow, uses: subflow, params: {blueprintId: hitl-sub}}
  - {id: main-end, uses: add10}
edges:
  - {source: main-start, target: subflow}
  - {source: subflow, target: main-end}
"""
    sub = """
id: hitl-sub
nodes:
  - {id: sub-start, uses: echo}
  - {id: sub-wait, uses: wait}
  - {id: sub-end, uses: add5}
edges:
  - {source: sub-start, target: sub-wait}
  - {source: sub-wait, target: sub-end}
"""
    s = flow.session([parent, sub], {"v42": lambda ctx: 42, "echo": lambda ctx: ctx.input,
                                     "add5": lambda ctx: ctx.input["value"] + 5,
                                     "add10": lambda ctx: {"final": ctx.input + 10}})
    r = s.run("main")
    assert r.status == "awaiting", r.reason
    assert r.view.awaiting_nodes == ["subflow"]
    r = s.resume(r.run_id, "subflow", output={"value": 47})
    assert r.status == "completed", r.reason
    assert r.outputs["main-end"] == {"final": 62}


def test_loop_side_branch_runs_every_iteration_and_iterations_do_not_overlap(flow):
    doc = """
id: loop-side
nodes:
  - {id: init, uses: init}
  - {id: loop, uses: loop-controller, params: {condition: "counter < 6"}}
  - {id: a, uses: inc}
  - {id: log, uses: log}
  - {id: end, uses: end}
edges:
  - {source: init, target: loop}
  - {source: loop, target: a, action: continue}
  - {source: a, target: loop}
  - {source: a, target: log}
  - {source: loop, target: end, action: break}
"""
    seen: list[int] = []

    async def log(ctx):
        import asyncio

        await asyncio.sleep(0.02)  # slower than the loop-back: the next iteration must wait for it
        seen.append(ctx.input)

    r = flow.run(doc, {"init": _init, "inc": _inc, "log": log, "end": lambda ctx: "done"})
    assert r.status == "completed"
    assert seen == [1, 2, 3, 4, 5, 6]
    assert r.outputs["end"] == "done"


def test_child_with_two_waits_resumed_directly_completes_parent(flow):
    parent = """
id: p2
nodes:
  - {id: call, uses: subflow, params: {blueprintId: two-waits}}
  - {id: after, uses: echo}
edges:
  - {source: call, target: after}
"""
    sub = """
id: two-waits
nodes:
  - {id: w1, uses: wait}
  - {id: w2, uses: wait}
  - {id: join, uses: echo}
edges:
  - {source: w1, target: join}
  - {source: w2, target: join}
"""
    s = flow.session([parent, sub], {"echo": lambda ctx: ctx.input})
    r = s.run("p2")
    assert r.status == "awaiting" and r.view.awaiting_nodes == ["call"]
    import pytest

    from flowcraft_cli.errors import InvalidInput

    with pytest.raises(InvalidInput, match="resume the child run itself"):
        s.resume(r.run_id, "call", output=1)
    child = next(n for n in r.view.nodes if n.node_id == "call")
    assert child.status == "awaiting"
    child_id = f"{r.run_id}::call.1.1"
    s.resume(child_id, "w1", output="one")
    r2 = s.resume(child_id, "w2", output="two")
    assert r2.status == "completed"
    final = s.result(r.run_id)
    assert final.status == "completed", final.reason
    assert final.outputs["after"] == {"w1": "one", "w2": "two"}


def test_refused_resume_of_a_subflow_node_leaves_the_parent_awaiting(flow):
    parent = """
id: pr
nodes:
  - {id: call, uses: subflow, params: {blueprintId: asks}}
  - {id: after, uses: echo}
edges:
  - {source: call, target: after}
"""
    sub = """
id: asks
nodes:
  - {id: w, uses: wait}
  - {id: ok, uses: echo}
edges:
  - {source: w, target: ok, action: approve}
"""
    import pytest

    from flowcraft_cli.errors import InvalidInput

    s = flow.session([parent, sub], {"echo": lambda ctx: ctx.input})
    r = s.run("pr")
    assert r.status == "awaiting" and r.view.awaiting_nodes == ["call"]
    with pytest.raises(InvalidInput, match="matches no edge"):
        s.resume(r.run_id, "call", output=1, action="aprove")
    refused = s.result(r.run_id)
    assert refused.status == "awaiting" and refused.view.awaiting_nodes == ["call"]
    assert next(n for n in refused.view.nodes if n.node_id == "call").status == "awaiting"
    final = s.resume(r.run_id, "call", output=7, action="approve")
    assert final.status == "completed", final.reason
    assert final.outputs["after"] == 7


def test_nested_loops_with_a_slow_side_branch(flow):
    doc = """
id: nested
nodes:
  - {id: init, uses: init2}
  - {id: outer, uses: loop-controller, params: {condition: "i < 2"}}
  - {id: inner, uses: loop-controller, params: {condition: "j < 3"}}
  - {id: oinc, uses: oinc}
  - {id: b, uses: body}
  - {id: side, uses: side}
  - {id: c, uses: tag}
  - {id: end, uses: tag}
edges:
  - {source: init, target: outer}
  - {source: outer, target: oinc, action: continue}
  - {source: oinc, target: inner}
  - {source: inner, target: b, action: continue}
  - {source: b, target: inner}
  - {source: b, target: side}
  - {source: inner, target: c, action: break}
  - {source: c, target: outer}
  - {source: outer, target: end, action: break}
"""
    seen: list[tuple[int, int]] = []

    async def init2(ctx):
        await ctx.context.set("i", 0)
        await ctx.context.set("j", 0)

    async def oinc(ctx):
        await ctx.context.set("i", await ctx.context.get("i") + 1)
        await ctx.context.set("j", 0)

    async def body(ctx):
        j = await ctx.context.get("j") + 1
        await ctx.context.set("j", j)
        seen.append((await ctx.context.get("i"), j))

    async def side(ctx):
        import asyncio

        await asyncio.sleep(0.02)

    r = flow.run(doc, {"init2": init2, "oinc": oinc, "body": body, "side": side, "tag": lambda ctx: ctx.node_id})
    assert r.status == "completed", r.reason
    assert seen == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert r.outputs["end"] == "end"


def test_cancelling_a_waiting_child_fails_its_subflow_node(flow):
    parent = """
id: pc
nodes:
  - {id: call, uses: subflow, params: {blueprintId: waits}}
  - {id: after, uses: tag}
edges:
  - {source: call, target: after}
"""
    sub = """
id: waits
nodes: [{id: w, uses: wait}]
edges: []
"""
    s = flow.session([parent, sub], {"tag": lambda ctx: ctx.node_id})
    r = s.run("pc")
    assert r.status == "awaiting"
    child_id = f"{r.run_id}::call.1.1"
    s.cancel(child_id)
    final = s.result(r.run_id)
    assert final.status == "failed" and "cancelled" in final.reason
    assert "after" not in final.outputs


def test_wide_loop_body_with_an_early_loop_back(flow):
    """The loop-back arrives while 40 body nodes are still busy: the next iteration waits for all of them."""
    wide = 40
    nodes = "\n".join(f"  - {{id: w{i}, uses: tick}}" for i in range(wide))
    edges = "\n".join(f"  - {{source: a, target: w{i}}}" for i in range(wide))
    doc = f"""
id: wide-loop
nodes:
  - {{id: init, uses: init}}
  - {{id: loop, uses: loop-controller, params: {{condition: "counter < 3"}}}}
  - {{id: a, uses: inc}}
{nodes}
  - {{id: end, uses: tag}}
edges:
  - {{source: init, target: loop}}
  - {{source: loop, target: a, action: continue}}
  - {{source: a, target: loop}}
{edges}
  - {{source: loop, target: end, action: break}}
"""
    ticks: list[int] = []

    async def tick(ctx):
        ticks.append(ctx.input)

    r = flow.run(doc, {"init": _init, "inc": _inc, "tick": tick, "tag": lambda ctx: ctx.node_id})
    assert r.status == "completed", r.reason
    assert sorted(ticks) == [1] * wide + [2] * wide + [3] * wide
    assert ticks == sorted(ticks)  # iteration k+1 started only after every tick of iteration k



def test_node_ids_with_separators_never_share_a_join_field(flow):
    """``b -> a|0`` and ``0|b -> a`` are two different arrivals (their fields were both ``a|0|0|b``)."""
    doc = """
id: separators
nodes:
  - {id: b, uses: tag}
  - {id: "0|b", uses: tag}
  - {id: "a|0", uses: tag}
  - {id: a, uses: tag}
edges:
  - {source: b, target: "a|0"}
  - {source: "0|b", target: a}
"""
    r = flow.run(doc, {"tag": lambda ctx: ctx.node_id})
    assert r.status == "completed", r.reason
    assert {n.node_id: n.status for n in r.view.nodes} == dict.fromkeys(["b", "0|b", "a|0", "a"], "completed")
    assert r.context["_inputs.a"] == "0|b" and r.context["_inputs.a|0"] == "b"


def test_a_node_named_like_a_marker_or_an_escape_is_one_more_predecessor(flow):
    """An arrival from node ``#`` is not the join's count; ``p%7Cq`` and ``p|q`` are two predecessors."""
    doc = """
id: markers
nodes:
  - {id: "#", uses: tag}
  - {id: x, uses: tag}
  - {id: t, uses: tag}
  - {id: "p%7Cq", uses: tag}
  - {id: "p|q", uses: tag}
  - {id: u, uses: tag}
edges:
  - {source: "#", target: t}
  - {source: x, target: t}
  - {source: "p%7Cq", target: u}
  - {source: "p|q", target: u}
"""
    r = flow.run(doc, {"tag": lambda ctx: ctx.input if ctx.node_id in ("t", "u") else ctx.node_id})
    assert r.status == "completed", r.reason
    assert r.outputs["t"] == {"#": "#", "x": "x"}
    assert r.outputs["u"] == {"p%7Cq": "p%7Cq", "p|q": "p|q"}


def test_run_ids_are_checked_and_no_user_id_is_a_child_id(flow):
    import hashlib

    import pytest

    from flowcraft_cli.errors import InvalidInput

    parent = """
id: pw
nodes:
  - {id: "call me", uses: subflow, params: {blueprintId: waits}}
edges: []
"""
    sub = """
id: waits
nodes: [{id: w, uses: wait}]
edges: []
"""
    s = flow.session([parent, sub])
    r = s.run("pw", run_id="R")
    assert r.status == "awaiting"
    child_id = f"R::h{hashlib.sha256(b'call me').hexdigest()[:12]}.1.1"
    assert s.result(child_id).status == "awaiting"
    assert s.run("waits", run_id="R.call me.1.1".replace(" ", "_")).status == "awaiting"  # an ordinary user id
    for bad, needle in [(child_id, "reserved for subflow child runs"), ("a b", "' ' not allowed"),
                        ("x" * 129, "at most 128"), ("", "must not be empty")]:
        with pytest.raises(InvalidInput, match=needle):
            s.run("waits", run_id=bad)
    assert s.run("waits", run_id="x" * 128).status == "awaiting"


def test_idempotency_key_is_stable_per_execution_and_distinct_otherwise(flow):
    """CONTRACT §4: one key for every attempt of one node execution; another for each loop iteration,
    batch item, node and run."""
    keys: dict[str, list[str]] = {}

    def seen(ctx):
        keys.setdefault(ctx.node_id + str(ctx.extra.get("item_index", "")), []).append(ctx.idempotency_key)

    async def flaky(ctx):
        seen(ctx)
        if ctx.attempt < 3:
            raise RuntimeError("try again")
        return "ok"

    async def inc(ctx):
        seen(ctx)
        return await _inc(ctx)

    def item(ctx):
        seen(ctx)
        return ctx.input

    doc = LOOP.replace("  - {id: end, uses: end}", """  - {id: end, uses: end}
  - {id: retry, uses: flaky, config: {maxRetries: 3}}
  - {id: items, uses: batch, params: {worker: item}}""").replace("  - {source: loop, target: end, action: break}", """  - {source: loop, target: end, action: break}
  - {source: end, target: retry}
  - {source: retry, target: items, transform: "[1, 2]"}""")
    s = flow.session(doc, {"init": _init, "inc": inc, "end": lambda ctx: "finished", "flaky": flaky, "item": item})
    r1 = s.run("loop", {})
    assert r1.status == "completed", r1.reason
    assert len(keys["retry"]) == 3 and len(set(keys["retry"])) == 1  # every attempt: one key
    assert len(set(keys["body"])) == 3  # each loop iteration: its own key
    assert keys["items0"] != keys["items1"]  # each batch item: its own key
    first = {k: v[0] for k, v in keys.items()}
    assert len(set(first.values())) == len(first)  # no two executions share a key
    keys.clear()
    s.run("loop", {})
    assert not set(first.values()) & {v[0] for v in keys.values()}  # another run: other keys
    assert all(v.startswith("fc_") and len(v) == 35 for v in first.values())


def test_a_failed_attempt_keeps_the_nodes_traceback(flow):
    """CONTRACT §10: each failed attempt carries the node's own traceback (its frames, not flowcraft's)."""

    def parse_amount(text):
        return int(text)

    def bad(ctx):
        return parse_amount("twelve")

    r = flow.run("id: tb\nnodes:\n  - {id: n, uses: bad, config: {maxRetries: 2}}\n", {"bad": bad})
    assert r.status == "failed"
    failed = [t for t in r.view.timeline if t["outcome"] == "failed"]
    assert len(failed) == 2
    tb = failed[0]["traceback"]
    assert "test_scenarios.py" in tb and "parse_amount" in tb and tb.rstrip().endswith(
        "ValueError: invalid literal for int() with base 10: 'twelve'")
    assert "flowcraft_cli" not in tb and "asyncio" not in tb


RETRY = """
id: retry
nodes:
  - {id: start, uses: count}
  - {id: flaky, uses: flaky, config: {maxRetries: 2}}
  - {id: side, uses: count}
  - {id: join, uses: count}
  - {id: end, uses: count}
edges:
  - {source: start, target: flaky}
  - {source: start, target: side}
  - {source: flaky, target: join}
  - {source: side, target: join}
  - {source: join, target: end}
"""


def test_retry_runs_only_the_failed_node_and_what_it_kept_from_running(flow):
    """CONTRACT §10 retry: same run id, fresh attempts for the failed node, completed nodes keep their outputs
    and do not run again; the join counts the branch that had already arrived."""
    calls: Counter[str] = Counter()
    broken = {"yes": True}

    def count(ctx):
        calls[ctx.node_id] += 1
        return ctx.node_id

    def flaky(ctx):
        calls["flaky"] += 1
        deadline = time.monotonic() + 30
        while ctx.context.get("_outputs.side") is None and time.monotonic() < deadline:
            time.sleep(0.01)  # fail only after the parallel branch arrived at the join: a deterministic test
        if broken["yes"]:
            raise RuntimeError("the database is down")
        return {"attempt": ctx.attempt}

    s = flow.session(RETRY, {"count": count, "flaky": flaky})
    first = s.run("retry", {})
    assert first.status == "failed" and calls == {"start": 1, "side": 1, "flaky": 2}
    broken["yes"] = False
    second = s.retry(first.run_id)
    assert second.status == "completed", second.reason
    assert calls == {"start": 1, "side": 1, "flaky": 3, "join": 1, "end": 1}
    assert second.outputs["flaky"] == {"attempt": 1}  # fresh attempts
    flaky_view = next(n for n in second.view.nodes if n.node_id == "flaky")
    assert flaky_view.status == "completed" and flaky_view.error is None
    with pytest.raises(StateConflict):
        s.retry(first.run_id)  # a completed run is not retried


def test_context_variables_a_node_sets_do_not_reach_the_next_node(flow):
    """Each node runs in a task of its own: a context variable one sets (a request id a logging library
    binds) is not seen by the node after it, even when that one runs inline in the same worker slot."""
    import contextvars

    seen = contextvars.ContextVar("seen", default="unset")
    doc = """
id: ctxvars
nodes: [{id: a, uses: setter}, {id: b, uses: reader}]
edges: [{source: a, target: b}]
"""

    async def setter(ctx):
        seen.set("from a")
        return "a"

    async def reader(ctx):
        return seen.get()

    r = flow.run(doc, {"setter": setter, "reader": reader})
    assert r.status == "completed"
    assert r.outputs["b"] == "unset"


def test_a_retry_claimed_by_a_siblings_commit_keeps_the_nodes_first_start():
    """In-process, x's commit claims q's retry (its delay over) to run next: q's record still says the node
    started with its first attempt, as a retry claimed from its own job keeps it."""
    import asyncio

    from flowcraft_cli.runtime import FlowRuntime
    from tests.harness import make_blueprints, make_registry

    doc = {"id": "fan", "nodes": [{"id": "s", "uses": "fast"}, {"id": "p", "uses": "slow"},
                                  {"id": "q", "uses": "flaky", "config": {"maxRetries": 2, "retryDelay": 20}},
                                  {"id": "x", "uses": "slow"}],
           "edges": [{"source": "s", "target": "p"}, {"source": "s", "target": "q"}, {"source": "s", "target": "x"}]}
    first: dict[str, float] = {}

    async def fast(ctx):
        return 1

    async def slow(ctx):
        await asyncio.sleep(0.3 if ctx.node_id == "p" else 0.15)
        return 1

    async def flaky(ctx):
        if ctx.attempt == 1:
            first["q"] = time.time() * 1000
            raise RuntimeError("once")
        return 1

    async def go():
        reg = make_registry({"fast": fast, "slow": slow, "flaky": flaky})
        rt = FlowRuntime(make_blueprints([doc], reg), reg, concurrency=2)
        res = await rt.run("fan", {})
        return res, await rt.engine.store.read(res.run_id, "nodes", ["q"])

    res, (q,) = asyncio.run(go())
    assert res.status == "completed"
    assert q["attempt"] == 2 and q["started_at"] <= first["q"]  # stamped by the first attempt's claim


def test_a_node_may_use_asyncio_timeout_and_task_groups(flow):
    """A node's first step runs at once (engine.eager), still as its own task: an asyncio.timeout it enters
    cancels the node's wait, not the step that called it, and a TaskGroup's children belong to the node."""
    import asyncio

    doc = """
id: timeouts
nodes: [{id: a, uses: bounded}, {id: b, uses: grouped}]
edges: [{source: a, target: b}]
"""

    async def bounded(ctx):
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)
        except TimeoutError:
            return "gave up"
        return "slept"

    async def grouped(ctx):
        async with asyncio.TaskGroup() as tg:
            parts = [tg.create_task(asyncio.sleep(0.01, result=i)) for i in range(3)]
        return [ctx.input, *(p.result() for p in parts)]

    r = flow.run(doc, {"bounded": bounded, "grouped": grouped})
    assert r.status == "completed", r.reason
    assert r.outputs == {"a": "gave up", "b": ["gave up", 0, 1, 2]}
