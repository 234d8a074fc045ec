"""flowcraft: run Flowcraft workflow blueprints in-process or across many machines on arq + Redis.

``import flowcraft_cli`` stays cheap: it never imports arq, typer or rich. The distributed names are
loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import FlowcraftError

if TYPE_CHECKING:
    from .blueprint import Blueprint
    from .config import Settings, load_settings
    from .distributed.adapter import ArqAdapter
    from .distributed.context import RedisContext
    from .distributed.coordination import RedisCoordinationStore
    from .distributed.reconciler import create_arq_reconciler
    from .loading import load_blueprints, parse_blueprint
    from .node_api import NodeContext, NodeResult
    from .registry import NodeRegistry, node
    from .runtime import FlowRuntime, RunResult

# Every name but FlowcraftError is imported on first use: the CLI's views import this package and need
# none of them (the blueprint model, the node API and the registry cost ~20 ms at start-up).
_LAZY = {
    "Blueprint": ("blueprint", "Blueprint"),
    "NodeContext": ("node_api", "NodeContext"),
    "NodeResult": ("node_api", "NodeResult"),
    "NodeRegistry": ("registry", "NodeRegistry"),
    "node": ("registry", "node"),
    "FlowRuntime": ("runtime", "FlowRuntime"),
    "RunResult": ("runtime", "RunResult"),
    "load_blueprints": ("loading", "load_blueprints"),
    "parse_blueprint": ("loading", "parse_blueprint"),
    "load_settings": ("config", "load_settings"),
    "Settings": ("config", "Settings"),
    "ArqAdapter": ("distributed.adapter", "ArqAdapter"),
    "RedisContext": ("distributed.context", "RedisContext"),
    "RedisCoordinationStore": ("distributed.coordination", "RedisCoordinationStore"),
    "create_arq_reconciler": ("distributed.reconciler", "create_arq_reconciler"),
}

__all__ = [
    "ArqAdapter",
    "Blueprint",
    "FlowRuntime",
    "FlowcraftError",
    "NodeContext",
    "NodeRegistry",
    "NodeResult",
    "RedisContext",
    "RedisCoordinationStore",
    "RunResult",
    "Settings",
    "create_arq_reconciler",
    "load_blueprints",
    "load_settings",
    "node",
    "parse_blueprint",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flowcraft_cli' has no attribute {name!r}")
