"""NodeRegistry, the ``@node`` decorator, and loading registry modules by name."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, overload

from .errors import ConfigError

NodeFn = Callable[..., Any]


class NodeRegistry:
    """Maps a ``uses`` name to a node function (``async def`` or plain ``def``)."""

    def __init__(self, nodes: dict[str, NodeFn] | None = None) -> None:
        self._nodes: dict[str, NodeFn] = dict(nodes or {})

    def register(self, name: str, fn: NodeFn) -> NodeFn:
        from .blueprint import BUILTINS

        if name in BUILTINS:
            raise ConfigError(f"node name {name!r} is a built-in and cannot be registered")
        existing = self._nodes.get(name)
        if existing is not None and existing is not fn and _qualname(existing) != _qualname(fn):
            raise ConfigError(
                f"node name {name!r} is registered twice: {_qualname(existing)} and {_qualname(fn)}"
            )
        self._nodes[name] = fn
        return fn

    def get(self, name: str) -> NodeFn | None:
        return self._nodes.get(name)

    def names(self) -> list[str]:
        return sorted(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def merged(self, other: NodeRegistry) -> NodeRegistry:
        out = NodeRegistry(self._nodes)
        for name in other.names():
            out.register(name, other._nodes[name])
        return out


def _qualname(fn: NodeFn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


#: The registry that ``@node`` writes to; ``load_registry`` returns it after importing modules.
default_registry = NodeRegistry()


@overload
def node(name_or_fn: NodeFn, /) -> NodeFn: ...
@overload
def node(name_or_fn: str | None = None, /, *, registry: NodeRegistry | None = None) -> Callable[[NodeFn], NodeFn]: ...


def node(name_or_fn: Any = None, /, *, registry: NodeRegistry | None = None) -> Any:
    """Register a node function: ``@node("validate-order")`` or ``@node`` (the function's name)."""
    target = registry or default_registry
    if callable(name_or_fn):
        fn = name_or_fn
        return target.register(fn.__name__, fn)

    def deco(fn: NodeFn) -> NodeFn:
        if not (inspect.iscoroutinefunction(fn) or callable(fn)):
            raise ConfigError(f"@node target {fn!r} is not callable")
        return target.register(name_or_fn or fn.__name__, fn)

    return deco


def load_registry(modules: Iterable[str], *, cwd: str | None = None) -> NodeRegistry:
    """Import each module (the working directory is importable) and return the default registry."""
    root = os.path.abspath(cwd or os.getcwd())
    if root not in sys.path:
        sys.path.insert(0, root)
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                raise ConfigError(
                    f"registry: module {name!r} not found (looked in {root} and sys.path)"
                ) from None
            raise ConfigError(f"registry: importing {name!r} failed: {e}") from None
        except ConfigError:
            raise
        except Exception as e:  # a user module that raises at import: say which, keep it short
            raise ConfigError(f"registry: importing {name!r} failed: {type(e).__name__}: {e}") from None
    return default_registry
