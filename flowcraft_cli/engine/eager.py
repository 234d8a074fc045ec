"""Starting a coroutine as a task of its own, eagerly: its first step runs now, in the caller's turn of the
event loop, and one that ends without ever waiting (a no-op node, a node that computes and returns) is done
before ``start`` returns, costing no trip through the event loop. One that waits goes on as a task.

Each node runs in a task of its own (``function.call_node``): its context variables stay there, and
``asyncio.timeout`` or a ``TaskGroup`` it opens cancel that task, not the step that called it. So the first
step runs with that task as the current one, and in a copy of the caller's context, just as it would have run
had the task been scheduled. Python 3.12 does exactly this (``asyncio.Task(..., eager_start=True)``); on 3.11
the same is done by hand, with asyncio's own ``_enter_task``/``_leave_task`` (what the task runner calls).
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start(coro: Coroutine[Any, Any, T], *, own: bool = True) -> asyncio.Future[T]:
    """``coro`` run up to its first wait, as the first step of a task of its own. Returns a future that is
    done already if it ended (result, exception or cancel), else the task that runs the rest. ``own=False``:
    the first step runs in the caller's task and context, and a task is made only for a rest (for flowcraft's
    own code, which sets no context variable and opens no timeout before it calls a node)."""
    if not own:
        return _start_here(coro)
    return _start(coro)


def _start_here(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    loop = asyncio.get_running_loop()
    try:
        yielded = coro.send(None)
    except StopIteration as e:
        return _settled(loop, result=e.value)
    except asyncio.CancelledError:
        return _settled(loop, cancelled=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        return _settled(loop, error=e)
    first = _First()
    first.yielded = yielded
    return loop.create_task(_rest(coro, first))


class _First:
    """What the first step, run by hand, left: the value the coroutine yielded (it waits), or its end."""

    __slots__ = ("yielded", "ended")

    def __init__(self) -> None:
        self.yielded: Any = None
        self.ended = False


def _settled(loop: asyncio.AbstractEventLoop, *, result: Any = None, error: BaseException | None = None,
             cancelled: bool = False) -> asyncio.Future[Any]:
    done = loop.create_future()
    if cancelled:
        done.cancel()
    elif error is None:
        done.set_result(result)
    else:
        done.set_exception(error)
    return done


async def _rest(coro: Coroutine[Any, Any, Any], first: _First) -> Any:
    """The task's own steps: the coroutine from where its first step left it, driven as a task drives one
    (a future it yields is waited for, a bare ``yield`` gives the loop one turn), with every exception and
    cancel the task meets thrown into it. Ends at once when the first step ended the coroutine (the result
    went back through ``start``'s own future)."""
    if first.ended:
        return None
    yielded = first.yielded
    while True:
        try:
            await _wait(yielded)
        except BaseException as e:
            send: Any = coro.throw
            value: Any = e
        else:
            send, value = coro.send, None
        try:
            yielded = send(value)
        except StopIteration as e:
            return e.value


@types.coroutine
def _wait(yielded: Any) -> Generator[Any, None, None]:
    """Hand what the coroutine yielded on to the task running ``_rest``, as if the coroutine itself had:
    a future (its blocking flag set by its ``__await__``), or None (``asyncio.sleep(0)``)."""
    yield yielded


if sys.version_info >= (3, 12):
    def _start(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        return asyncio.Task(coro, loop=asyncio.get_running_loop(), eager_start=True)  # type: ignore[call-arg]
else:
    from asyncio.tasks import _enter_task, _leave_task  # (private to asyncio; stable from 3.7 to 3.13)

    def _start(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        first = _First()
        task = loop.create_task(_rest(coro, first), context=ctx)
        caller = asyncio.current_task(loop)
        if caller is not None:
            _leave_task(loop, caller)
        _enter_task(loop, task)
        try:
            first.yielded = ctx.run(coro.send, None)
        except StopIteration as e:
            first.ended = True
            return _settled(loop, result=e.value)
        except asyncio.CancelledError:
            first.ended = True
            return _settled(loop, cancelled=True)
        except (KeyboardInterrupt, SystemExit):
            first.ended = True
            raise
        except BaseException as e:  # (as a task keeps an exception: for whoever awaits it)
            first.ended = True
            return _settled(loop, error=e)
        finally:
            _leave_task(loop, task)
            if caller is not None:
                _enter_task(loop, caller)
        return task
