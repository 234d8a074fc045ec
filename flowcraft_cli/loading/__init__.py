"""Blueprint documents to validated :class:`~flowcraft_cli.blueprint.Blueprint` models.

- ``decode``: YAML/JSON text to a document, problems located by line (the only module that imports PyYAML)
- ``parse``: a document to a Blueprint, every problem collected (``FILE: path.in.document: message``)
- ``specs``: the params of the built-in nodes, parsed into ``NodeDef.spec`` (LoopSpec, SleepSpec, ...)
- ``checks``: graph checks (fallbacks, loop-controller edges, cycles, start nodes, reachability)
- ``files``: files and folders to blueprints, with cross-file checks (duplicate ids, subflow targets)
- ``problems``: the problem list and how a bad value or a hint is written

``import flowcraft_cli.loading`` does not import PyYAML: parsing a document that is already decoded (a
definition read from Redis) needs none. The names that read files are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .parse import parse_blueprint
from .specs import loop_condition, parse_duration_ms

if TYPE_CHECKING:
    from .decode import decode_yaml
    from .files import BLUEPRINT_SUFFIXES, load_blueprint_file, load_blueprints, load_blueprints_lenient

_LAZY = {
    "BLUEPRINT_SUFFIXES": "files",
    "decode_yaml": "decode",
    "load_blueprint_file": "files",
    "load_blueprints": "files",
    "load_blueprints_lenient": "files",
}

__all__ = [
    "BLUEPRINT_SUFFIXES",
    "decode_yaml",
    "load_blueprint_file",
    "load_blueprints",
    "load_blueprints_lenient",
    "loop_condition",
    "parse_blueprint",
    "parse_duration_ms",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
