"""flowcraft: run Flowcraft workflow blueprints in-process or across many machines on arq + Redis.

``import flowcraft_cli`` stays cheap: it never imports arq, typer or rich. The distributed names are
loaded on first use.
"""

from __future__ import annotations

from typing import Any

from .blueprint import Blueprint
from .errors import FlowcraftError
from .node_api import NodeContext, NodeResult
from .registry import NodeRegistry, node

_LAZY = {
    "FlowRuntime": ("runtime", "FlowRuntime"),
    "RunResult": ("runtime", "RunResult"),
    "load_blueprints": ("loader", "load_blueprints"),
    "parse_blueprint": ("loader", "parse_blueprint"),
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
