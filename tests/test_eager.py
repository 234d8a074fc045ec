"""engine.eager: a node's first step runs at once, as the first step of a task of its own."""

import asyncio
import contextvars
import sys

import pytest

from flowcraft_cli.engine import eager


def test_a_coroutine_that_never_waits_is_done_when_start_returns():
    async def quick():
        return 42

    async def go():
        fut = eager.start(quick())
        assert fut.done()
        return fut.result()

    assert asyncio.run(go()) == 42


def test_its_first_step_runs_in_its_own_task_and_context_and_the_rest_as_that_task():
    var = contextvars.ContextVar("var", default="unset")

    async def node(seen):
        seen.append(asyncio.current_task())
        var.set("node")
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.001)  # a future
        seen.append(asyncio.current_task())
        return var.get()

    async def go():
        seen = []
        caller = asyncio.current_task()
        fut = eager.start(node(seen))
        assert not fut.done() and len(seen) == 1  # the first step ran, up to the first wait
        assert asyncio.current_task() is caller  # handed back
        assert seen[0] is fut and seen[0] is not caller
        assert var.get() == "unset"  # the node's context is a copy
        assert await fut == "node"
        assert seen[1] is fut
        return True

    assert asyncio.run(go())


STARTS = [pytest.param(eager.start, id="start"), pytest.param(eager.start_here, id="start_here")]


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("where", ["first step", "later"])
def test_an_error_and_a_cancel_reach_whoever_awaits_it(where, start):
    async def fails():
        if where == "later":
            await asyncio.sleep(0)
        raise ValueError("boom")

    async def cancels_itself():
        if where == "later":
            await asyncio.sleep(0)
        raise asyncio.CancelledError()

    async def go():
        with pytest.raises(ValueError, match="boom"):
            await start(fails())
        fut = start(cancels_itself())
        with pytest.raises(asyncio.CancelledError):
            await fut
        assert fut.cancelled()
        return True

    assert asyncio.run(go())


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("when", ["before its task's first turn", "once it waits in its task"])
def test_a_cancel_of_its_task_is_thrown_into_the_coroutine_where_it_waits(when, start):
    """(review) The task that runs the rest gets its first turn later: a cancel that comes before that turn must
    still be thrown into the coroutine at its wait, not into a wrapper that never started."""
    async def node(log):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        finally:
            log.append("finally")

    async def go():
        log = []
        fut = start(node(log))
        if when != "before its task's first turn":
            await asyncio.sleep(0)
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut
        return log

    assert asyncio.run(go()) == ["cancelled", "finally"]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="start_here is start on 3.12")
def test_start_here_runs_the_first_step_in_the_caller_s_task_and_only_a_rest_in_a_task_of_its_own():
    """The engine's own coroutines (function.call_node, which gives the user's function a task of its own) need
    no task for a first step that ends: one is made only for what is left after a wait."""
    async def node(seen, wait):
        seen.append(asyncio.current_task())
        if wait:
            await asyncio.sleep(0.001)
            seen.append(asyncio.current_task())
        return len(seen)

    async def go():
        caller, seen = asyncio.current_task(), []
        quick = eager.start_here(node(seen, False))
        assert quick.done() and quick.result() == 1 and seen == [caller]
        assert not isinstance(quick, asyncio.Task)
        seen.clear()
        slow = eager.start_here(node(seen, True))
        assert not slow.done() and seen == [caller] and isinstance(slow, asyncio.Task)
        assert await slow == 2 and seen[1] is slow
        return True

    assert asyncio.run(go())


def test_asyncio_timeout_in_its_first_step_cancels_the_node_not_the_caller():
    """asyncio.timeout takes the current task when it is entered: in the first step that must be the node's."""
    async def node():
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(10)
        except TimeoutError:
            return "timed out"
        return "slept"

    async def go():
        fut = eager.start(node())
        got = await fut
        await asyncio.sleep(0.02)  # the caller is not cancelled later either
        return got, asyncio.current_task().cancelling()

    assert asyncio.run(go()) == ("timed out", 0)



# ---- through the in-process runtime (review findings)

PY312 = "/root/.pyenv/versions/3.12.1/bin/python3"


def _runtime(doc, nodes, **kw):
    from flowcraft_cli.runtime import FlowRuntime
    from tests.harness import make_blueprints, make_registry

    registry = make_registry(nodes)
    return FlowRuntime(make_blueprints([doc], registry), registry, **kw)


def test_a_node_run_ahead_that_times_out_fails_its_attempt_and_does_not_cancel_the_step():
    """A node run ahead of its predecessor's commit runs in a task of its own from its first step on (the user's
    function: function.call_node starts it so; call_node itself starts in the step's task, eager.start_here): its
    timeout (asyncio.wait_for, which on Python 3.12 binds an asyncio.timeout to the current task) cancels the
    node, never the step that ran it ahead."""
    doc = {"id": "c", "nodes": [{"id": "a", "uses": "quick"}, {"id": "b", "uses": "slow", "config": {"timeout": 5}}],
           "edges": [{"source": "a", "target": "b"}]}

    async def quick(ctx):
        return 1

    async def slow(ctx):
        await asyncio.sleep(0.3)
        return 2

    result = asyncio.run(_runtime(doc, {"quick": quick, "slow": slow}).run("c"))
    assert result.status == "failed" and "timed out" in (result.reason or ""), result.reason


def _py312_ready() -> bool:
    import os
    import subprocess

    if os.environ.get("FLOWCRAFT_TEST_NO_PY312") or not os.path.exists(PY312):
        return False
    got = subprocess.run([PY312, "-c", "import pytest, msgspec, redis, arq, typer, rich, yaml"], capture_output=True)
    return got.returncode == 0


@pytest.mark.skipif(sys.version_info >= (3, 12) or not _py312_ready(),
                    reason="needs a Python 3.12 beside this one, with flowcraft's dependencies")
def test_eager_starts_and_timeouts_under_python_3_12_as_well():
    """The same on 3.12, where eager starts are asyncio's own (eager_start) and wait_for uses asyncio.timeout."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tests = [f"{__file__}::{name}" for name in (
        "test_a_node_run_ahead_that_times_out_fails_its_attempt_and_does_not_cancel_the_step",
        "test_asyncio_timeout_in_its_first_step_cancels_the_node_not_the_caller",
        "test_a_cancel_of_its_task_is_thrown_into_the_coroutine_where_it_waits")]
    got = subprocess.run([PY312, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stdout[-3000:]


def test_a_node_may_copy_its_context_with_dataclasses_replace():
    import dataclasses

    seen = {}

    async def node(ctx):
        other = dataclasses.replace(ctx, input=2)
        seen["same_key"] = other.idempotency_key == ctx.idempotency_key and ctx.idempotency_key.startswith("fc_")
        return other.input

    result = asyncio.run(_runtime({"id": "g", "nodes": [{"id": "a", "uses": "node"}], "edges": []},
                                  {"node": node}).run("g"))
    assert result.status == "completed" and result.outputs["a"] == 2 and seen["same_key"], result.reason


def test_a_node_that_is_an_unhashable_callable_object_runs():
    import dataclasses

    @dataclasses.dataclass
    class Greeter:
        greeting: str

        async def __call__(self, ctx):
            return f"{self.greeting} {ctx.input}"

    result = asyncio.run(_runtime({"id": "g", "nodes": [{"id": "a", "uses": "greet"}], "edges": []},
                                  {"greet": Greeter("hi")}).run("g", "bob"))
    assert result.status == "completed", result.reason
    assert result.outputs["a"] == "hi bob"
