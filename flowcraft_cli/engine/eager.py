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
import collections.abc
import contextvars
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """``coro`` run up to its first wait, as the first step of a task of its own. Returns a future that is
    done already if it ended (result, exception or cancel), else the task that runs the rest."""
    return _start(coro)


def start_here(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """``start``, for the engine's own coroutines that run a node (``function.call_node``, which starts the
    user's function as a task of its own): on 3.11 their first step runs in the caller's task and context, and a
    task is made only for a rest (a node that waited). Python 3.12's eager task costs little: there it is one."""
    return _start_here(coro)


if sys.version_info >= (3, 12):
    def _start(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        return asyncio.Task(coro, loop=asyncio.get_running_loop(), eager_start=True)  # type: ignore[call-arg]

    _start_here = _start
else:
    from asyncio.tasks import _enter_task, _leave_task  # (private to asyncio; stable from 3.7 to 3.13)

    def _start(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        rest = _Rest(coro)
        task = loop.create_task(rest, context=ctx)  # type: ignore[arg-type]
        caller = asyncio.current_task(loop)
        if caller is not None:
            _leave_task(loop, caller)
        _enter_task(loop, task)
        try:
            ended, rest.first = _first_step(loop, lambda: ctx.run(coro.send, None))
        except BaseException:  # (KeyboardInterrupt, SystemExit: raised, and the task ends at once)
            rest.ended = True
            raise
        finally:
            _leave_task(loop, task)
            if caller is not None:
                _enter_task(loop, caller)
        rest.ended = ended is not None
        return task if ended is None else ended

    def _start_here(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        ended, first = _first_step(loop, lambda: coro.send(None))
        if ended is not None:
            return ended
        rest = _Rest(coro)
        rest.first = first
        return loop.create_task(rest)  # type: ignore[arg-type]

    def _first_step(loop: asyncio.AbstractEventLoop,
                    step: Callable[[], Any]) -> tuple[asyncio.Future[Any] | None, Any]:
        """Run a coroutine's first step (``step``): (None, what it yielded) if it waits, else (a future settled as
        it ended, None): its result, exception or cancel, kept as a task keeps an outcome."""
        try:
            return None, step()
        except StopIteration as e:
            return _settled(loop, result=e.value), None
        except asyncio.CancelledError:
            return _settled(loop, cancelled=True), None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            return _settled(loop, error=e), None

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

    class _Rest(collections.abc.Coroutine):  # type: ignore[type-arg]
        """What the task runs: the coroutine itself, from where its first step (run by ``_start``) left it. The
        task's first ``send`` gets back what that step yielded (the future it waits on, or None for a bare
        yield), and every later ``send`` and every ``throw`` (a cancel, a failed future) goes to the coroutine,
        as the task would have sent it: a cancel that comes before the task's first turn reaches the coroutine
        where it waits, too. A coroutine that ended in its first step ends the task at once (its outcome went
        back through ``start``'s own future)."""

        __slots__ = ("coro", "first", "ended", "started")

        def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
            self.coro = coro
            self.first: Any = None
            self.ended = False
            self.started = False

        def send(self, value: Any) -> Any:
            if not self.started:
                self.started = True
                if self.ended:
                    raise StopIteration(None)
                return self.first
            return self.coro.send(value)

        def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
            self.started = True
            if self.ended:
                raise typ if val is None else val
            return self.coro.throw(typ) if val is None else self.coro.throw(typ, val, tb)

        def close(self) -> None:
            if not self.ended:
                self.coro.close()

        def __await__(self) -> Generator[Any, None, Any]:
            raise TypeError("run by its task only")  # (never awaited: asyncio drives it with send and throw)
