"""The bundled examples (``nodes.py`` + ``blueprints/``) run in-process and do what their comments and the
README say. If an example changes, this file says which promise broke."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flowcraft_cli.loading import load_blueprints
from flowcraft_cli.registry import load_registry
from flowcraft_cli.runtime import FlowRuntime, RunResult

ROOT = Path(__file__).resolve().parent.parent

ORDER = {"order": {"id": "A-1", "items": [{"sku": "book", "qty": 2, "price": 12.5}]}}


@pytest.fixture(scope="module")
def examples():
    registry = load_registry(["nodes"], cwd=str(ROOT))
    return registry, load_blueprints([ROOT / "blueprints"], registry)


def run(examples, blueprint_id: str, run_input: Any = None) -> tuple[RunResult, list[dict[str, Any]]]:
    registry, blueprints = examples

    async def go() -> tuple[RunResult, list[dict[str, Any]]]:
        runtime = FlowRuntime(blueprints, registry)
        result = await runtime.run(blueprint_id, run_input)
        return result, await runtime.store.read_events(result.run_id)

    return asyncio.run(go())


def nodes_of(r: RunResult) -> dict[str, Any]:
    return {n.node_id: n for n in r.view.nodes}


def statuses(r: RunResult) -> dict[str, str]:
    return {n.node_id: n.status for n in r.view.nodes}


def failed_attempts(events: list[dict[str, Any]], node_id: str) -> list[int]:
    return [e["attempt"] for e in events if e["type"] == "attempt_failed" and e["node"] == node_id]


# -- every bundled blueprint ------------------------------------------------------------------------------

QUICK_INPUTS = {
    "order-processing": ORDER,
    "shipping": {"order": {"id": "S-1", "items": [{"sku": "lamp", "qty": 3, "price": 45}]}},
    "fan-out": {"text": "never odd or even"},
    "countdown": {"start": 3},
    "slow-chain": {"job": "demo", "slow_seconds": 0.05},
    "wide": None,
}


def test_the_bundled_set_is_what_the_readme_lists(examples):
    _, blueprints = examples
    assert set(blueprints) == set(QUICK_INPUTS) | {"approval"}
    for bp_id, bp in blueprints.items():
        assert Path(bp.source).stem == bp_id  # one blueprint per file, id == file stem


@pytest.mark.parametrize("blueprint_id", sorted(QUICK_INPUTS))
def test_every_example_completes(examples, blueprint_id):
    r, _ = run(examples, blueprint_id, QUICK_INPUTS[blueprint_id])
    assert r.status == "completed", r.reason
    assert r.reason is None
    # the only failed node in any example is order-processing's `notify`, whose fallback stands in for it
    assert {n for n, s in statuses(r).items() if s == "failed"} <= {"notify"}


# -- order-processing: routing by action, retries, fallbacks ----------------------------------------------


def test_order_processing_happy_path(examples):
    r, events = run(examples, "order-processing", ORDER)
    assert r.status == "completed", r.reason
    assert statuses(r) == {
        "validate": "completed",
        "charge": "completed",
        "defer": "skipped",
        "notify": "failed",
        "log": "completed",
        "complete": "completed",
        "reject": "skipped",
    }
    assert r.outputs["validate"] == {"order_id": "A-1", "items": 1, "total": 25.0}
    assert r.context["total"] == 25.0

    # the flaky charge failed twice (fail_times: 2) and succeeded on its third and last attempt
    assert failed_attempts(events, "charge") == [1, 2]
    assert nodes_of(r)["charge"].attempts == 3
    assert r.outputs["charge"] == {
        "order_id": "A-1",
        "charged": 25.0,
        "currency": "EUR",
        "payment_id": "pay-A-1",
        "attempts": 3,
    }

    # send-email always fails; its fallback's output stands in for it and reaches the successor
    assert failed_attempts(events, "notify") == [1]
    assert "mail server" in nodes_of(r)["notify"].error
    assert r.outputs["notify"] == r.outputs["log"]
    assert r.outputs["complete"] == {
        "order_id": "A-1",
        "status": "paid",
        "charged": 25.0,
        "payment_id": "pay-A-1",
        "notified_via": "log",
    }
    assert "_outputs.reject" not in r.context and "_outputs.defer" not in r.context


@pytest.mark.parametrize("run_input", [None, {}, {"order": {"id": "E-1", "items": []}}])
def test_order_processing_without_items_is_rejected(examples, run_input):
    r, events = run(examples, "order-processing", run_input)
    assert r.status == "completed", r.reason
    order_id = "E-1" if run_input and run_input.get("order") else "unknown"
    assert r.outputs["reject"] == {"order_id": order_id, "status": "rejected", "reason": "order has no items"}
    assert set(r.outputs) == {"validate", "reject"}
    assert {n for n, s in statuses(r).items() if s == "skipped"} == {
        "charge",
        "defer",
        "notify",
        "log",
        "complete",
    }
    assert not failed_attempts(events, "charge")


def test_order_processing_rejects_invalid_items(examples):
    order = {"order": {"id": "B-2", "items": [{"sku": "book", "qty": 0, "price": 12.5}]}}
    r, _ = run(examples, "order-processing", order)
    assert r.status == "completed"
    assert r.outputs["reject"]["status"] == "rejected"
    assert "qty and price must be positive" in r.outputs["reject"]["reason"]


def test_order_processing_charge_fallback_after_exhausted_retries(examples):
    order = {"order": {"id": "A-2", "items": [{"sku": "pen", "qty": 4, "price": 2.5}], "payment_failures": 5}}
    r, events = run(examples, "order-processing", order)
    assert r.status == "completed", r.reason
    assert failed_attempts(events, "charge") == [1, 2, 3]  # maxRetries: 3 total attempts, then the fallback
    charge = nodes_of(r)["charge"]
    assert charge.status == "failed" and "simulated failure 3 of 5" in charge.error
    assert nodes_of(r)["defer"].status == "completed"
    assert r.outputs["charge"] == r.outputs["defer"]
    assert r.outputs["charge"]["deferred"] is True
    assert r.context["payment_deferred"] is True
    assert r.outputs["complete"] == {
        "order_id": "A-2",
        "status": "payment deferred",
        "charged": 0,
        "payment_id": None,
        "notified_via": "log",
    }


def test_failed_node_with_fallback_reports_all_its_attempts(examples):
    order = {"order": {"id": "A-3", "items": [{"sku": "pen", "qty": 1, "price": 1}], "payment_failures": 5}}
    r, _ = run(examples, "order-processing", order)
    assert nodes_of(r)["charge"].attempts == 3


# -- shipping: conditional branches and an `all` join with a skipped branch --------------------------------


@pytest.mark.parametrize(
    ("items", "taken", "skipped", "cost"),
    [
        ([{"sku": "lamp", "qty": 3, "price": 45}], "express", "standard", 0),
        ([{"sku": "pen", "qty": 2, "price": 1.5}], "standard", "express", 4.95),
    ],
)
def test_shipping_takes_one_branch_and_the_join_still_runs(examples, items, taken, skipped, cost):
    r, _ = run(examples, "shipping", {"order": {"id": "S-1", "items": items}})
    assert r.status == "completed", r.reason
    assert statuses(r)[skipped] == "skipped" and f"_outputs.{skipped}" not in r.context
    assert statuses(r)[taken] == "completed"
    assert r.context["_inputs.label"] == {"pack": {"boxes": 1}, taken: {"carrier": taken, "cost": cost}}
    assert r.outputs["label"] == {
        "order_id": "S-1",
        "label": f"S-1 / {taken} / 1 box(es)",
        "shipping_cost": cost,
        "received_from": sorted(["pack", taken]),
    }
    assert nodes_of(r)["label"].runs == 1


def test_shipping_boundary_is_standard(examples):
    r, _ = run(
        examples, "shipping", {"order": {"id": "S-3", "items": [{"sku": "x", "qty": 10, "price": 10}]}}
    )
    assert r.outputs["quote"]["total"] == 100
    assert statuses(r)["express"] == "skipped" and statuses(r)["standard"] == "completed"
    assert r.outputs["pack"] == {"boxes": 2}


# -- fan-out: parallel branches, a batch, one join --------------------------------------------------------


def test_fan_out_joins_three_branches_once(examples):
    r, _ = run(examples, "fan-out", {"text": "never odd or even"})
    assert r.status == "completed", r.reason
    assert r.outputs["split"] == ["never", "odd", "or", "even"]
    assert r.outputs["upper"] == ["NEVER", "ODD", "OR", "EVEN"]  # batch results keep item order
    assert nodes_of(r)["upper"].note == "4 items"
    assert set(r.context["_inputs.report"]) == {"count", "longest", "upper"}
    assert r.outputs["report"] == {"words": 4, "longest": "never", "shouted": "NEVER ODD OR EVEN"}
    assert nodes_of(r)["report"].runs == 1


def test_fan_out_default_text(examples):
    r, _ = run(examples, "fan-out")
    assert r.status == "completed", r.reason
    assert r.outputs["report"] == {
        "words": 9,
        "longest": "quick",
        "shouted": "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    }


# -- countdown: loop-controller ---------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "ticks"), [(5, [5, 4, 3, 2, 1]), (1, [1])])
def test_countdown_loops_start_times(examples, start, ticks):
    r, _ = run(examples, "countdown", {"start": start})
    assert r.status == "completed", r.reason
    assert nodes_of(r)["tick"].runs == start  # the body ran once per iteration
    assert nodes_of(r)["loop"].runs == start + 1  # the entry arrival plus one per loop-back
    assert r.context["ticks"] == ticks
    assert r.context["counter"] == 0
    assert r.outputs["liftoff"] == f"liftoff after {start} ticks: {' '.join(map(str, ticks))}"


def test_countdown_default_and_zero(examples):
    r, _ = run(examples, "countdown")
    assert r.outputs["liftoff"] == "liftoff after 3 ticks: 3 2 1"
    r, _ = run(examples, "countdown", {"start": 0})
    assert r.status == "completed"
    assert statuses(r)["tick"] == "skipped"
    assert r.outputs["liftoff"] == "liftoff after 0 ticks:"


def test_countdown_stops_at_max_iterations(examples):
    r, _ = run(examples, "countdown", {"start": 100})
    assert r.status == "completed", r.reason
    assert nodes_of(r)["tick"].runs == 50  # maxIterations: 50
    assert r.context["counter"] == 50
    assert r.outputs["liftoff"].startswith("liftoff after 50 ticks: 100 99")


# -- slow-chain and wide ----------------------------------------------------------------------------------


def test_slow_chain(examples):
    _, blueprints = examples
    assert blueprints["slow-chain"].node_map["slow"].params == {"seconds": 2}  # the default stays slow
    r, _ = run(examples, "slow-chain", {"job": "demo", "slow_seconds": 0.05})  # run input override
    assert r.status == "completed", r.reason
    assert r.outputs["slow"] == {"job": "demo", "slow_seconds": 0.05}  # slow passes its input through
    assert r.context["_inputs.join"] == {
        "left": {"node": "left", "slept_ms": 10},
        "right": {"node": "right", "slept_ms": 10},
    }
    assert r.outputs["end"] == {"count": 2, "from": ["left", "right"]}


def test_wide_fans_out_to_fifty_and_joins_once(examples):
    r, _ = run(examples, "wide")
    assert r.status == "completed", r.reason
    names = [f"n{i:02d}" for i in range(1, 51)]
    assert all(statuses(r)[n] == "completed" and nodes_of(r)[n].runs == 1 for n in names)
    assert r.outputs["join"] == {"count": 50, "from": names}
    assert nodes_of(r)["join"].runs == 1


def test_slow_chain_default_duration(examples):
    r, _ = run(examples, "slow-chain", {"job": "demo"})  # params.seconds: 2, the real default (takes 2 s)
    assert r.status == "completed", r.reason
    assert r.outputs["end"] == {"count": 2, "from": ["left", "right"]}


# -- approval: a wait node resumed with an action ---------------------------------------------------------


def test_approval_waits_then_follows_the_resume_action(examples):
    registry, blueprints = examples

    async def go():
        rt = FlowRuntime(blueprints, registry)
        r = await rt.run("approval", {"expense": {"id": "E-7", "amount": 120}})
        assert r.status == "awaiting" and r.view.awaiting_nodes == ["review"]
        done = await rt.resume(r.run_id, output={"by": "dana"}, action="approve")
        return done

    r = asyncio.run(go())
    assert r.status == "completed"
    assert r.outputs["pay"] == {"id": "E-7", "paid": 120.0, "approved_by": "dana"}
    assert statuses(r)["decline"] == "skipped"
