"""YAML and JSON text to a document, with problems located by line (1-based) and duplicate keys refused.

The only module of ``loading`` that imports PyYAML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys (plain PyYAML silently keeps the last one)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[tuple[int, Any]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` overrides are intended
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: the base constructor reports it
                    continue
                if duplicate:
                    self.duplicate_keys.append((key_node.start_mark.line + 1, key))
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def decode_yaml(text: str, source: str) -> tuple[Any, list[str]]:
    """Parse YAML safely; returns (data, problems) with problems like ``FILE: line N: ...`` (1-based)."""
    loader = _StrictSafeLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"line {mark.line + 1}" if mark is not None else "top level"
        problem = e.problem or e.context or "invalid YAML"
        if e.context and e.problem and e.context_mark is not None:
            problem += f" ({e.context} at line {e.context_mark.line + 1})"
        return None, [f"{source}: {line}: {problem}"]
    except yaml.YAMLError as e:
        return None, [f"{source}: invalid YAML: {e}"]
    finally:
        loader.dispose()
    problems = [f"{source}: line {line}: duplicate key {key!r}" for line, key in loader.duplicate_keys]
    return data, problems


def decode_json(text: str, source: str) -> tuple[Any, list[str]]:
    """Parse JSON; returns (data, problems), a duplicate key in any object being a problem."""
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                duplicates.append(key)
            obj[key] = value
        return obj

    try:
        data = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as e:
        return None, [f"{source}: line {e.lineno} column {e.colno}: {e.msg}"]
    return data, [f"{source}: duplicate key {key!r} in a JSON object" for key in duplicates]


def read_document(path: Path, source: str) -> tuple[Any, list[str]]:
    """Read and decode one file (JSON by its ``.json`` suffix, else YAML); ``source`` names it in problems."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        return None, [f"{source}: not UTF-8 text ({e.reason} at byte {e.start})"]
    except OSError as e:
        return None, [f"{source}: cannot read: {e.strerror or e}"]
    if path.suffix.lower() == ".json":
        return decode_json(text, source)
    return decode_yaml(text, source)
