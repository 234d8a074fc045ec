"""The example nodes behind the bundled blueprints in ``blueprints/``.

``flowcraft`` imports this module at start-up because the config names it (``registry: [nodes]``; the
working directory is importable). Every ``@node("name")`` function below can then be used in a blueprint as
``uses: name``.

A few things worth noticing while reading:

* ``async def`` nodes run on the event loop; plain ``def`` nodes run in a thread, so they may block
  (``time.sleep``, a synchronous HTTP client, ...). Both kinds are mixed here on purpose.
* The run context is awaited in ``async def`` nodes (``await ctx.context.get(...)``) and called directly in
  plain ``def`` nodes (``ctx.context.get(...)``). Context writes are committed together with the node's
  result, so a failed attempt leaves nothing behind.
* Return a plain value to produce an output, or ``NodeResult(output=..., action=...)`` to also choose which
  outgoing edges are taken. Raising an exception fails the attempt (and triggers retries / the fallback).
* Everything is deterministic and offline: the "payment gateway" and the "mail server" are simulated, so the
  examples behave the same on every machine, and the tests in ``tests/test_examples.py`` can assert on them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from flowcraft_cli import NodeContext, NodeResult, node

# --------------------------------------------------------------------------------------------------------
# order-processing.yaml: routing by action, retries with backoff, fallbacks
# --------------------------------------------------------------------------------------------------------


@node("validate-order")
async def validate_order(ctx: NodeContext) -> NodeResult:
    """Check the order and price it. Action ``ok`` routes to the charge, ``reject`` to the rejection.

    The blueprint gives this node ``inputs: order``, so ``ctx.input`` is the run input's ``order`` value
    (``None`` when the run input has no ``order`` key, e.g. ``flowcraft run order-processing`` with no input).
    """
    order = ctx.input if isinstance(ctx.input, dict) else {}
    order_id = order.get("id", "unknown")
    items = order.get("items") or []
    if not items:
        return NodeResult(output={"order_id": order_id, "reason": "order has no items"}, action="reject")

    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        return NodeResult(
            output={"order_id": order_id, "reason": "items must be a list of objects"}, action="reject"
        )
    problems = [
        f"item {i}: qty and price must be positive numbers"
        for i, item in enumerate(items)
        if not _positive(item.get("qty")) or not _positive(item.get("price"))
    ]
    if problems and ctx.params.get("strict", True):
        return NodeResult(output={"order_id": order_id, "reason": "; ".join(problems)}, action="reject")

    total = round(
        sum(
            item["qty"] * item["price"]
            for item in items
            if _positive(item.get("qty")) and _positive(item.get("price"))
        ),
        2,
    )
    # Later nodes (and edge conditions, as the bare name `total`) can read this from the run context.
    await ctx.context.set("total", total)
    return NodeResult(output={"order_id": order_id, "items": len(items), "total": total}, action="ok")


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@node("charge-payment")
async def charge_payment(ctx: NodeContext) -> dict[str, Any]:
    """A *flaky* payment gateway: attempts 1..fail_times raise, the next one succeeds.

    ``params.fail_times`` (default 0) sets how many attempts fail. A run can override it with
    ``order.payment_failures`` in its input, e.g. ``5`` to exhaust the retries and see the fallback run.
    With ``config: {maxRetries: 3, retryDelay: 100}`` and ``fail_times: 2`` the charge succeeds on attempt 3
    after waiting 100 ms and then 200 ms (the delay doubles).
    """
    order = await ctx.context.get("order") or {}
    fail_times = order.get("payment_failures", ctx.params.get("fail_times", 0))
    if ctx.attempt <= fail_times:
        raise RuntimeError(f"payment gateway timed out (simulated failure {ctx.attempt} of {fail_times})")
    charge = ctx.input
    return {
        "order_id": charge["order_id"],
        "charged": charge["total"],
        "currency": ctx.params.get("currency", "EUR"),
        # deterministic, so examples and tests can compare it
        "payment_id": f"pay-{charge['order_id']}",
        "attempts": ctx.attempt,
    }


@node("defer-payment")
def defer_payment(ctx: NodeContext) -> dict[str, Any]:
    """Fallback for ``charge``: runs with the same input after the last failed attempt, and its output stands
    in for the charge's, so the run carries on along the charge's edges."""
    ctx.context.set("payment_deferred", True)
    return {
        "order_id": ctx.input["order_id"],
        "charged": 0,
        "currency": "EUR",
        "payment_id": None,
        "deferred": True,
        "note": "payment gateway unavailable; charge queued for a manual retry",
    }


@node("send-email")
def send_email(ctx: NodeContext) -> None:
    """Always fails: this example has no mail server. The blueprint gives it a fallback, so the run still
    completes; ``flowcraft inspect`` shows this node as failed and the fallback as having stood in."""
    raise ConnectionError(f"cannot reach mail server {ctx.params.get('smtp_host', 'smtp.example.invalid')}")


@node("log-notification")
def log_notification(ctx: NodeContext) -> dict[str, Any]:
    """Fallback for ``send-email``: record the notification instead of sending it."""
    payment = ctx.input
    return {
        "channel": "log",
        "order_id": payment["order_id"],
        "message": f"order {payment['order_id']} confirmed; notification logged, not emailed",
    }


@node("complete-order")
async def complete_order(ctx: NodeContext) -> dict[str, Any]:
    """The happy path's last step: one readable summary built from earlier outputs in the run context."""
    payment = await ctx.context.get("_outputs.charge")
    return {
        "order_id": payment["order_id"],
        "status": "payment deferred" if payment.get("deferred") else "paid",
        "charged": payment["charged"],
        "payment_id": payment["payment_id"],
        "notified_via": ctx.input["channel"],
    }


@node("reject-order")
def reject_order(ctx: NodeContext) -> dict[str, Any]:
    """Reached only when ``validate`` returned action ``reject``."""
    return {"order_id": ctx.input["order_id"], "status": "rejected", "reason": ctx.input["reason"]}


# --------------------------------------------------------------------------------------------------------
# shipping.yaml: conditional edges and an `all` join where one branch is skipped
# --------------------------------------------------------------------------------------------------------


@node("quote-order")
def quote_order(ctx: NodeContext) -> dict[str, Any]:
    """Price an order; the outgoing edges' conditions (``result.output.total > 100``) pick a shipping method."""
    order = ctx.input if isinstance(ctx.input, dict) else {}
    items = order.get("items") or []
    total = round(sum(i.get("qty", 0) * i.get("price", 0) for i in items), 2)
    return {
        "order_id": order.get("id", "unknown"),
        "items": sum(i.get("qty", 0) for i in items),
        "total": total,
    }


@node("pack-items")
async def pack_items(ctx: NodeContext) -> dict[str, Any]:
    per_box = ctx.params.get("per_box", 5)
    boxes = max(1, -(-ctx.input["items"] // per_box))  # ceiling division
    return {"boxes": boxes}


@node("ship")
def ship(ctx: NodeContext) -> dict[str, Any]:
    """One node type, two blueprint nodes (express / standard) configured by params."""
    return {"carrier": ctx.params["carrier"], "cost": ctx.params.get("cost", 0)}


@node("print-label")
def print_label(ctx: NodeContext) -> dict[str, Any]:
    """An ``all`` join: ``ctx.input`` is ``{predecessor_id: output}`` of the edges that were taken, so the
    skipped shipping branch simply is not in it."""
    shipping = ctx.input.get("express") or ctx.input.get("standard")
    quote = ctx.context.get("_outputs.quote")
    return {
        "order_id": quote["order_id"],
        "label": f"{quote['order_id']} / {shipping['carrier']} / {ctx.input['pack']['boxes']} box(es)",
        "shipping_cost": shipping["cost"],
        "received_from": sorted(ctx.input),
    }


# --------------------------------------------------------------------------------------------------------
# fan-out.yaml: one start, parallel branches (one of them a `batch`), one join
# --------------------------------------------------------------------------------------------------------

SAMPLE_TEXT = "the quick brown fox jumps over the lazy dog"


@node("split-words")
def split_words(ctx: NodeContext) -> list[str]:
    """Start node: gets the run input; ``{"text": ...}``, with a sample sentence when it is missing."""
    run_input = ctx.input if isinstance(ctx.input, dict) else {}
    return str(run_input.get("text") or SAMPLE_TEXT).split()


@node("count-words")
async def count_words(ctx: NodeContext) -> int:
    return len(ctx.input)


@node("longest-word")
def longest_word(ctx: NodeContext) -> str:
    return max(ctx.input, key=len, default="")


@node("shout")
async def shout(ctx: NodeContext) -> str:
    """The ``batch`` worker: called once per list item, as parallel jobs; the batch node's output is the list
    of results in item order. ``ctx.input`` is one item."""
    await asyncio.sleep(ctx.params.get("delay_ms", 0) / 1000)
    return ctx.input.upper()


@node("merge-report")
def merge_report(ctx: NodeContext) -> dict[str, Any]:
    """Fan-in: runs once, after all three branches, with ``{branch_id: output}``."""
    return {
        "words": ctx.input["count"],
        "longest": ctx.input["longest"],
        "shouted": " ".join(ctx.input["upper"]),
    }


# --------------------------------------------------------------------------------------------------------
# countdown.yaml: a loop driven by the built-in `loop-controller`
# --------------------------------------------------------------------------------------------------------


@node("countdown-init")
async def countdown_init(ctx: NodeContext) -> int:
    """Seed the loop counter from the run input's ``start`` (default 3). The loop-controller's condition
    ``counter > 0`` reads this context key by its bare name."""
    run_input = ctx.input if isinstance(ctx.input, dict) else {}
    start = int(run_input.get("start", ctx.params.get("start", 3)))
    await ctx.context.set("counter", start)
    await ctx.context.set("ticks", [])
    return start


@node("countdown-tick")
def countdown_tick(ctx: NodeContext) -> int:
    """The loop body: runs once per iteration, then flows back into the loop-controller."""
    counter = ctx.context.get("counter")
    ctx.context.set("ticks", [*ctx.context.get("ticks", []), counter])
    ctx.context.set("counter", counter - 1)
    return counter - 1


@node("liftoff")
async def liftoff(ctx: NodeContext) -> str:
    """Reached over the loop-controller's ``break`` edge once ``counter > 0`` is false (or maxIterations hit)."""
    ticks = await ctx.context.get("ticks", [])
    return f"liftoff after {len(ticks)} ticks: {' '.join(str(t) for t in ticks)}".strip()


# --------------------------------------------------------------------------------------------------------
# slow-chain.yaml and wide.yaml: small building blocks for timing, crash and load experiments
# --------------------------------------------------------------------------------------------------------


@node("passthrough")
def passthrough(ctx: NodeContext) -> Any:
    """Returns its input unchanged."""
    return ctx.input


@node("slow")
async def slow(ctx: NodeContext) -> Any:
    """Sleeps, then returns its input unchanged: a long-running node to kill a worker in the middle of.

    Duration: ``params.seconds`` (default 1). A run may override it with a ``slow_seconds`` key in its run
    input (run input keys seed the run context, so this works wherever the node sits in the graph), e.g.
    ``--input '{"slow_seconds": 0.1}'`` for a quick run.
    """
    override = await ctx.context.get("slow_seconds")
    seconds = override if override is not None else ctx.params.get("seconds", 1)
    await asyncio.sleep(float(seconds))
    return ctx.input


@node("simulate-work")
def simulate_work(ctx: NodeContext) -> dict[str, Any]:
    """A cheap blocking node: ``time.sleep(params.ms / 1000)`` (default 0 ms), then reports who ran.

    Blocking is fine in a plain ``def`` node: it runs in a worker thread, not on the event loop.
    """
    ms = ctx.params.get("ms", 0)
    if ms:
        time.sleep(ms / 1000)
    return {"node": ctx.node_id, "slept_ms": ms}


@node("collect")
def collect(ctx: NodeContext) -> dict[str, Any]:
    """A join that summarises what arrived: how many predecessors delivered and which ones."""
    inputs = ctx.input if isinstance(ctx.input, dict) else {}
    return {"count": len(inputs), "from": sorted(inputs)}


# --------------------------------------------------------------------------------------------------------
# approval.yaml: a `wait` node, resumed with an action
# --------------------------------------------------------------------------------------------------------


@node("submit-expense")
def submit_expense(ctx: NodeContext) -> dict[str, Any]:
    """Normalise the expense that waits for review (``inputs: expense`` picks it out of the run input)."""
    expense = ctx.input if isinstance(ctx.input, dict) else {}
    return {"id": expense.get("id", "E-0"), "amount": float(expense.get("amount", 0))}


@node("pay-expense")
async def pay_expense(ctx: NodeContext) -> dict[str, Any]:
    """Runs only when ``review`` was resumed with action ``approve``; its output is the reviewer's."""
    decision = ctx.input["decision"] or {}
    return {"id": ctx.input["expense"]["id"], "paid": ctx.input["expense"]["amount"], "approved_by": decision.get("by")}


@node("decline-expense")
async def decline_expense(ctx: NodeContext) -> dict[str, Any]:
    """Runs only when ``review`` was resumed with action ``reject``."""
    decision = ctx.input["decision"] or {}
    return {"id": ctx.input["expense"]["id"], "declined": True, "reason": decision.get("reason", "not given")}
