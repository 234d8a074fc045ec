"""engine.eager: a node's first step runs at once, as the first step of a task of its own."""

import asyncio
import contextvars

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


@pytest.mark.parametrize("where", ["first step", "later"])
def test_an_error_and_a_cancel_reach_whoever_awaits_it(where):
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
            await eager.start(fails())
        fut = eager.start(cancels_itself())
        with pytest.raises(asyncio.CancelledError):
            await fut
        assert fut.cancelled()
        return True

    assert asyncio.run(go())


def test_a_cancel_of_its_task_is_thrown_into_the_coroutine_where_it_waits():
    async def node(log):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    async def go():
        log = []
        fut = eager.start(node(log))
        await asyncio.sleep(0)
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut
        return log

    assert asyncio.run(go()) == ["cancelled"]


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


def test_started_here_its_first_step_runs_in_the_caller_and_only_a_rest_gets_a_task():
    async def quick(seen):
        seen.append(asyncio.current_task())
        return "quick"

    async def slow(seen):
        seen.append(asyncio.current_task())
        await asyncio.sleep(0.001)
        seen.append(asyncio.current_task())
        return "slow"

    async def go():
        seen = []
        caller = asyncio.current_task()
        done = eager.start(quick(seen), own=False)
        assert done.done() and done.result() == "quick" and seen == [caller]
        seen.clear()
        rest = eager.start(slow(seen), own=False)
        assert not rest.done() and seen == [caller]
        assert await rest == "slow"
        assert seen[1] is rest
        return True

    assert asyncio.run(go())
