"""What a node function sees: ``NodeContext``, ``NodeResult`` and the run context view."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

_MISSING: Any = object()


@dataclass(slots=True)
class NodeResult:
    """Return this instead of a plain value to choose a route: ``NodeResult(output=x, action="reject")``."""

    output: Any = None
    action: str | None = None


class RunContext:
    """The run context as a node sees it. Writes are buffered and committed together with the node's
    result, so a crashed attempt leaves no partial writes; reads see the node's own writes first."""

    def __init__(self, read_one: Callable[[str], Awaitable[Any]], read_all: Callable[[], Awaitable[dict]]) -> None:
        self._read_one = read_one
        self._read_all = read_all
        self.writes: dict[str, Any] = {}  # key -> value, or _MISSING for a delete

    async def get(self, key: str, default: Any = None) -> Any:
        if key in self.writes:
            value = self.writes[key]
            return default if value is _MISSING else value
        value = await self._read_one(key)
        return default if value is _MISSING else value

    async def has(self, key: str) -> bool:
        if key in self.writes:
            return self.writes[key] is not _MISSING
        return await self._read_one(key) is not _MISSING

    async def set(self, key: str, value: Any) -> None:
        self.writes[str(key)] = value

    async def delete(self, key: str) -> None:
        self.writes[str(key)] = _MISSING

    async def to_dict(self) -> dict[str, Any]:
        data = dict(await self._read_all())
        for k, v in self.writes.items():
            if v is _MISSING:
                data.pop(k, None)
            else:
                data[k] = v
        return data


class SyncRunContext:
    """The same view for plain ``def`` nodes, which run in a thread: each call hops to the event loop."""

    def __init__(self, inner: RunContext, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop

    def _call(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def get(self, key: str, default: Any = None) -> Any:
        return self._call(self._inner.get(key, default))

    def has(self, key: str) -> bool:
        return self._call(self._inner.has(key))

    def set(self, key: str, value: Any) -> None:
        self._inner.writes[str(key)] = value

    def delete(self, key: str) -> None:
        self._inner.writes[str(key)] = _MISSING

    def to_dict(self) -> dict[str, Any]:
        return self._call(self._inner.to_dict())


@dataclass(slots=True)
class NodeContext:
    run_id: str
    node_id: str
    blueprint_id: str
    attempt: int
    input: Any
    params: Mapping[str, Any]
    context: RunContext | SyncRunContext
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. batch item index
    # the same for every attempt and redelivery of one node execution, different for any other: pass it to a
    # payment API or an upsert so the side effect happens once although the node may run more than once
    idempotency_key: str = ""

