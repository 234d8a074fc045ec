"""Calling a registered user function for one attempt: its context, its timeout, what it may return, and
the traceback and idempotency key it is given or leaves behind."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...blueprint import NodeDef
from ...errors import NodeFailure, NodeTimeout, json_type
from ...node_api import _MISSING, NodeContext, NodeResult, RunContext, SyncRunContext
from ...store import MISSING, STATE, check_json, dumpb, parse_json
from .. import eager
from ..reads import read_context

if TYPE_CHECKING:
    from ..step import Step


async def call_node(step: Step, runner: NodeDef, node_input: Any, attempt: int, *, uses: str | None = None,
                extra: dict[str, Any] | None = None,
                ahead: Mapping[str, Any] | None = None) -> tuple[Any, str | None, dict[str, Any]]:
    """Call the user's function once, with the attempt's timeout. Raises NodeFailure. ``ahead``: context
    fields the group this node runs ahead in wrote and did not commit yet (JSON text, or _MISSING: deleted),
    which its reads see over the run's (engine.ahead)."""
    name = uses or runner.uses
    fn = step.engine.registry.get(name)
    if fn is None:
        raise NodeFailure(f"node type {name!r} is not registered on worker {step.engine.worker_id}", fatal=True)
    engine, run_id = step.engine, step.run_id
    store_errors: list[BaseException] = []

    # A store error inside ctx.context is the worker's trouble, not the node's: remember it, so the
    # attempt is handed back below even when the node's code caught it or raised something else
    async def read_one(key: str) -> Any:
        if ahead and key in ahead:
            return ahead[key] if ahead[key] is _MISSING else parse_json(ahead[key])
        try:
            value = await read_context(engine.store, run_id, key)
        except Exception as e:
            store_errors.append(e)
            raise
        return _MISSING if value is MISSING else value

    async def read_all() -> dict[str, Any]:
        try:
            got = await engine.store.read_all(run_id, STATE)
        except Exception as e:
            store_errors.append(e)
            raise
        for key, raw in (ahead or {}).items():
            if raw is _MISSING:
                got.pop(key, None)
            else:
                got[key] = parse_json(raw)
        return got

    view = RunContext(read_one, read_all)
    item = (extra or {}).get("item_index", -1)
    ctx = NodeContext(run_id=run_id, node_id=runner.id, blueprint_id=step.bp.id, attempt=attempt,
                      input=node_input, params=runner.params, context=view, extra=extra or {},
                      idempotency_key=idempotency_key(run_id, runner.id, step.job.seq, item))
    # the attempt's own limit and nothing shorter (CONTRACT §6.1): the node's timeout, else the default
    timeout = runner.config.timeout_ms / 1000 if runner.config.timeout_ms else step.engine.settings.attempt_timeout_s
    try:
        if _is_async(fn):
            result = await _in_own_task(fn(ctx), timeout, step)
        else:
            step.waited = True
            loop = asyncio.get_running_loop()
            ctx.context = SyncRunContext(view, loop)
            result = await asyncio.wait_for(asyncio.to_thread(fn, ctx), timeout)  # (a copy of the context)
            if inspect.isawaitable(result):
                result = await _in_own_task(result, timeout, step)
    except TimeoutError:
        raise NodeTimeout(f"attempt {attempt} timed out after {int((timeout or 0) * 1000)} ms") from None
    except NodeFailure:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:  # the user's code failed: that is the attempt's error
        if store_errors:
            raise store_errors[0] from e  # the store failed under the node: hand the step back
        raise NodeFailure(f"{type(e).__name__}: {e}", traceback=user_traceback(e)) from e
    if isinstance(result, NodeResult):
        output, action = result.output, result.action
    else:
        output, action = result, None
    if action is not None and not isinstance(action, str):
        raise NodeFailure(f"node {runner.id!r} returned an action of type {json_type(action)}, not a string",
                          fatal=True)
    bad = json_problem(output)
    if bad:
        raise NodeFailure(f"node {runner.id!r} returned an output that is not JSON-serializable "
                          f"(a {bad})", fatal=True)
    for key, value in view.writes.items():
        if value is not _MISSING and (bad := json_problem(value)):
            raise NodeFailure(f"node {runner.id!r} set context key {key!r} to a value that is not "
                              f"JSON-serializable (a {bad})", fatal=True)
    return output, action, dict(view.writes)


async def _in_own_task(awaitable: Any, timeout: float | None, step: Step | None = None) -> Any:
    """Await a node's coroutine in a task of its own, in both runtimes and with or without a timeout: context
    variables the node sets stay in its task (they do not reach the next step run inline in this one), and a
    cancel of the step (a stopping worker) ends the step even when the node swallows it and returns."""
    me = asyncio.current_task()
    cancels = me.cancelling() if me is not None else 0
    # its first step runs now (eager.start): a node that never waits is done without a trip through the loop
    running = eager.start(awaitable) if inspect.iscoroutine(awaitable) else asyncio.ensure_future(awaitable)
    if running.done():
        result = running.result()
    else:
        if step is not None:
            step.waited = True  # (it waited for something: Step.waited)
        # (asyncio.wait_for, not a timer of its own: a step cancelled once the timeout fired ends at once,
        # whatever the node does with the cancel)
        result = await asyncio.wait_for(running, timeout)
    if me is not None and me.cancelling() > cancels:
        raise asyncio.CancelledError()  # the step was cancelled; the node's task swallowed it
    return result


# ---- built-ins


_SCALARS = (str, int, float, bool, type(None))


def json_problem(value: Any) -> str | None:
    if type(value) in _SCALARS or (type(value) is dict and len(value) <= 16 and all(
            type(k) is str and type(v) in _SCALARS for k, v in value.items())):
        return None  # (the common case, without a trial encoding; NaN and the infinities pass, as there)
    try:
        check_json(value)
        return None
    except (TypeError, ValueError):
        return _first_bad_type(value)


def _first_bad_type(value: Any) -> str:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
            if any(not isinstance(k, str | int | float | bool) and k is not None for k in v):
                return "dict key"
        elif isinstance(v, list | tuple):
            stack.extend(v)
        elif not isinstance(v, str | int | float | bool) and v is not None:
            return type(v).__name__
    return "value"



TRACEBACK_CAP = 8 * 1024
# flowcraft_cli/: every frame of flowcraft itself (this file is flowcraft_cli/engine/builtins/function.py)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def user_traceback(e: BaseException) -> str:
    """The traceback of a node's exception, its own frames only (not flowcraft's, not asyncio's), at most 8 KB:
    the end is kept, since the frames nearest the raise say the most."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(_OWN_DIR) and "/asyncio/" not in f.filename
              and "/concurrent/futures/" not in f.filename]
    text = "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)) + \
        "".join(traceback.format_exception_only(type(e), e))
    if len(text.encode()) > TRACEBACK_CAP:
        text = "…\n" + text.encode()[-(TRACEBACK_CAP - 4):].decode(errors="ignore")
    return text

def idempotency_key(run_id: str, node_id: str, seq: int, item: int = -1) -> str:
    """CONTRACT §4: the same for every attempt and redelivery of one node execution (run, node, firing —
    a loop iteration fires a node again with a new seq —, batch item) and different for any other. A hash,
    so any node id gives a fixed-length key that payment APIs and database constraints accept."""
    return "fc_" + hashlib.sha256(dumpb([run_id, node_id, seq, item])).hexdigest()[:32]  # (dumps's text, as UTF-8)


def _is_async(fn: Any) -> bool:
    """Is ``fn`` an async function, or an object with an async ``__call__``? Remembered for hashable ones:
    inspect's answer costs as much as a no-op node's whole call."""
    try:
        return _is_async_remembered(fn)
    except TypeError:  # (unhashable: a dataclass instance with an async __call__)
        return _is_async_now(fn)


@functools.lru_cache(maxsize=4096)
def _is_async_remembered(fn: Any) -> bool:
    return _is_async_now(fn)


def _is_async_now(fn: Any) -> bool:
    # an object with an async __call__ counts too
    call = type(fn).__dict__.get("__call__") if not inspect.isfunction(fn) else None
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
