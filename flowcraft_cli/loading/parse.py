"""A decoded document to a validated :class:`Blueprint`.

Validation collects every problem before raising, so one :class:`BlueprintError` lists them all, each line
``FILE: path.in.document: message`` (CONTRACT §3).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..blueprint import BUILTINS, Blueprint, BuiltinSpec, EdgeDef, JoinStrategy, NodeConfig, NodeDef
from ..errors import BlueprintError, ExpressionError
from ..expressions import Expression, compile_expression
from .checks import check_graph
from .problems import Problems, did_you_mean, is_number, key_path, show, type_name
from .specs import parse_spec

if TYPE_CHECKING:
    from ..registry import NodeRegistry

_TOP_KEYS = ("id", "nodes", "edges", "metadata")
_NODE_KEYS = ("id", "uses", "params", "inputs", "config")
# Flowcraft's compiler adds debug data that its own sanitizer strips; a compiled blueprint must load unchanged.
_IGNORED_NODE_KEYS = frozenset({"_sourceLocation"})
_EDGE_KEYS = ("source", "target", "action", "condition", "transform")
# document key -> canonical name; camelCase is Flowcraft's spelling, snake_case an accepted alias
_CONFIG_KEYS = {
    "maxRetries": "max_retries",
    "max_retries": "max_retries",
    "retryDelay": "retry_delay",
    "retry_delay": "retry_delay",
    "timeout": "timeout",
    "fallback": "fallback",
    "joinStrategy": "join_strategy",
    "join_strategy": "join_strategy",
}
# Flowcraft built-ins this project does not implement, with what to use instead.
_FLOWCRAFT_ONLY = {
    "batch-scatter": "use 'batch' with params.worker instead",
    "batch-gather": "use 'batch' with params.worker instead",
    "webhook": "use 'wait' and resume the run with `flowcraft resume`",
}
_MISSING: Any = object()


def parse_blueprint(
    data: Any,
    *,
    source: str = "<memory>",
    default_id: str | None = None,
    registry: NodeRegistry | None = None,
    known_blueprint_ids: Collection[str] | None = None,
) -> Blueprint:
    """Validate a decoded document and build the model; raises BlueprintError listing every problem.

    ``registry=None`` skips the ``uses`` (and batch worker) registration checks; ``known_blueprint_ids``, when
    given, is what subflow ``params.blueprintId`` must be one of.
    """
    parser = _Parser(source, registry, known_blueprint_ids)
    blueprint = parser.parse(data, default_id)
    if parser.problems or blueprint is None:
        raise BlueprintError(parser.problems.lines or [f"{source}: top level: not a valid blueprint"])
    return blueprint


@dataclass(slots=True)
class NodeDraft:
    """A node as parsed, before the graph checks; ``config`` holds NodeConfig's keyword arguments."""

    path: str
    id: str
    uses: str | None
    params: Mapping[str, Any]
    inputs: str | Mapping[str, str] | None
    config: dict[str, Any]
    fallback_path: str | None  # where `fallback` was written, for messages
    spec: BuiltinSpec | None


class _Parser:
    def __init__(
        self,
        source: str,
        registry: NodeRegistry | None,
        known_blueprint_ids: Collection[str] | None,
    ) -> None:
        self.registry = registry
        self.known_blueprint_ids = known_blueprint_ids
        self.problems = Problems(source)
        self.add = self.problems.add

    def required_str(self, data: Mapping[str, Any], key: str, parent: str, what: str) -> str | None:
        value = data.get(key, _MISSING)
        path = f"{parent}.{key}"
        if value is _MISSING or value is None:
            self.add(path, f"missing: {what}")
        elif not isinstance(value, str):
            self.add(path, f"must be a string, got {show(value)}")
        elif not value.strip():
            self.add(path, f"must not be empty: {what}")
        else:
            return value
        return None

    def entries(self, value: Any, key: str) -> list[tuple[str, Any]]:
        """``nodes``/``edges`` as (path, item); a mapping contributes its values (Flowcraft's sanitizer)."""
        if value is None:
            return []
        if isinstance(value, Mapping):
            return [(key_path(key, k), v) for k, v in value.items()]
        if isinstance(value, list | tuple):
            return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        self.add(key, f"must be a list (or a mapping) of {key}, got {type_name(value)}")
        return []

    def expression(self, value: Any, path: str, cache: dict[str, Expression]) -> Expression | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.add(path, f"must be a string expression, got {show(value)}")
            return None
        compiled = cache.get(value)
        if compiled is None:
            try:
                compiled = compile_expression(value)
            except ExpressionError as e:
                self.add(path, str(e))
                return None
            cache[value] = compiled
        return compiled

    # -- document --------------------------------------------------------------------------------

    def parse(self, data: Any, default_id: str | None) -> Blueprint | None:
        if not isinstance(data, Mapping):
            what = "empty" if data is None else type_name(data)
            self.add("top level", f"a blueprint must be a mapping with 'nodes' and 'edges', got {what}")
            return None
        for key in data:
            if key not in _TOP_KEYS:
                self.problems.unknown_key("", key, _TOP_KEYS)

        bp_id = self.parse_id(data, default_id)
        metadata = data.get("metadata")
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, Mapping):
            self.add("metadata", f"must be a mapping, got {type_name(data['metadata'])}")
            metadata = {}

        if data.get("nodes") is None:
            self.add("nodes", "missing: a blueprint needs a list of nodes")
        node_entries = self.entries(data.get("nodes"), "nodes")
        if isinstance(data.get("nodes"), Mapping | list | tuple) and not node_entries:
            self.add("nodes", "is empty: a blueprint needs at least one node")
        drafts = self.parse_nodes(node_entries)
        edges = self.parse_edges(self.entries(data.get("edges"), "edges"), drafts)
        check_graph(drafts, edges, self.problems)

        if self.problems or bp_id is None:
            return None
        nodes = tuple(
            NodeDef(
                id=d.id,
                uses=d.uses or "",
                params=d.params,
                inputs=d.inputs,
                config=NodeConfig(**d.config),
                spec=d.spec,
            )
            for d in drafts.values()
        )
        return Blueprint(
            id=bp_id,
            nodes=nodes,
            edges=tuple(e for e, _ in edges),
            metadata=metadata,
            raw=data,
            source=self.problems.source,
        )

    def parse_id(self, data: Mapping[str, Any], default_id: str | None) -> str | None:
        value = data.get("id")
        if value is None:
            if default_id:
                return default_id
            self.add(
                "id", "missing: a blueprint needs an 'id' (a file's blueprint defaults to its file name)"
            )
        elif not isinstance(value, str):
            self.add("id", f'must be a string, got {show(value)} (quote it: id: "{value}")')
        elif not value.strip():
            self.add("id", "must not be empty")
        else:
            return value
        return None

    # -- nodes -----------------------------------------------------------------------------------

    def parse_nodes(self, entries: list[tuple[str, Any]]) -> dict[str, NodeDraft]:
        drafts: dict[str, NodeDraft] = {}
        for path, raw in entries:
            if not isinstance(raw, Mapping):
                self.add(path, f"a node must be a mapping with 'id' and 'uses', got {type_name(raw)}")
                continue
            for key in raw:
                if key not in _NODE_KEYS and key not in _IGNORED_NODE_KEYS:
                    self.problems.unknown_key(path, key, _NODE_KEYS)
            node_id = self.required_str(raw, "id", path, "every node needs a unique id")
            uses = self.required_str(raw, "uses", path, "a registered node name or a built-in")
            params = raw.get("params")
            if params is None:
                params = {}
            elif not isinstance(params, Mapping):
                self.add(f"{path}.params", f"must be a mapping, got {type_name(params)}")
                params = {}
            inputs = self.parse_inputs(raw.get("inputs"), f"{path}.inputs")
            config, fallback_path = self.parse_config(raw.get("config"), f"{path}.config")
            spec = self.parse_uses(uses, params, path) if uses is not None else None
            if node_id is None:
                continue
            first = drafts.get(node_id)
            if first is not None:
                self.add(f"{path}.id", f"duplicate node id {node_id!r} (first defined at {first.path})")
                continue
            drafts[node_id] = NodeDraft(path, node_id, uses, params, inputs, config, fallback_path, spec)
        return drafts

    def parse_inputs(self, value: Any, path: str) -> str | Mapping[str, str] | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, Mapping):
            ok = True
            for name, ref in value.items():
                if not isinstance(name, str):
                    self.add(path, f"input names must be strings, got {show(name)}")
                    ok = False
                elif not isinstance(ref, str):
                    self.add(
                        key_path(path, name),
                        f"must be a string (a context key, node id or 'node.path'), got {show(ref)}",
                    )
                    ok = False
            return value if ok else None
        self.add(
            path,
            f"must be a string or a mapping of {{name: reference}}, got {type_name(value)} {show(value)}",
        )
        return None

    def parse_config(self, value: Any, path: str) -> tuple[dict[str, Any], str | None]:
        config: dict[str, Any] = {}
        if value is None:
            return config, None
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping, got {type_name(value)}")
            return config, None
        given: dict[str, str] = {}
        for key in value:
            name = _CONFIG_KEYS.get(key) if isinstance(key, str) else None
            if name is None:
                self.problems.unknown_key(
                    path, key, ("maxRetries", "retryDelay", "timeout", "fallback", "joinStrategy")
                )
            elif name in given:
                self.add(key_path(path, key), f"given twice, as {given[name]!r} and {key!r}")
            else:
                given[name] = key
        fallback_path = None
        for name, key in given.items():
            v = value[key]
            kpath = f"{path}.{key}"
            if v is None:
                continue
            if name == "max_retries":
                if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                    config["max_retries"] = v
                else:
                    self.add(
                        kpath,
                        f"must be an integer >= 1, got {show(v)} "
                        "(it counts total attempts: 1 = a single try, 3 = up to two retries)",
                    )
            elif name == "retry_delay":
                if is_number(v) and v >= 0:
                    config["retry_delay_ms"] = math.ceil(v)
                else:
                    self.add(kpath, f"must be a number of milliseconds >= 0, got {show(v)}")
            elif name == "timeout":
                if is_number(v) and v > 0:
                    config["timeout_ms"] = math.ceil(v)
                else:
                    self.add(kpath, f"must be a number of milliseconds > 0, got {show(v)}")
            elif name == "fallback":
                if isinstance(v, str) and v:
                    config["fallback"] = v
                    fallback_path = kpath
                else:
                    self.add(kpath, f"must be the id of another node, got {show(v)}")
            elif name == "join_strategy":
                if v in ("all", "any"):
                    config["join_strategy"] = JoinStrategy(v)
                else:
                    self.add(kpath, f"must be 'all' or 'any', got {show(v)}")
        return config, fallback_path

    def parse_uses(self, uses: str, params: Mapping[str, Any], path: str) -> BuiltinSpec | None:
        """The spec of a built-in; for any other node, the check that ``uses`` is registered."""
        if uses in BUILTINS:
            return parse_spec(uses, params, path, self.problems, self.registry, self.known_blueprint_ids)
        if self.registry is not None and uses not in self.registry:
            if uses in _FLOWCRAFT_ONLY:
                hint = (
                    f"; it is a Flowcraft built-in that flowcraft does not implement: {_FLOWCRAFT_ONLY[uses]}"
                )
            else:
                hint = did_you_mean(uses, [*self.registry.names(), *sorted(BUILTINS)])
                if not hint:
                    hint = " (is the module that defines it listed under `registry`?)"
            self.add(f"{path}.uses", f"{uses!r} is not registered{hint}")
        return None

    # -- edges -----------------------------------------------------------------------------------

    def parse_edges(
        self, entries: list[tuple[str, Any]], drafts: dict[str, NodeDraft]
    ) -> list[tuple[EdgeDef, str]]:
        """Edges whose both ends exist, with their document path; broken edges only add problems."""
        edges: list[tuple[EdgeDef, str]] = []
        cache: dict[str, Expression] = {}
        for index, (path, raw) in enumerate(entries):
            if not isinstance(raw, Mapping):
                self.add(path, f"an edge must be a mapping with 'source' and 'target', got {type_name(raw)}")
                continue
            for key in raw:
                if key not in _EDGE_KEYS:
                    self.problems.unknown_key(path, key, _EDGE_KEYS)
            ends = []
            for key in ("source", "target"):
                ref = self.required_str(raw, key, path, f"the id of the edge's {key} node")
                if ref is not None and ref not in drafts:
                    self.add(f"{path}.{key}", f"{ref!r} is not a node{did_you_mean(ref, drafts)}")
                    ref = None
                ends.append(ref)
            action = raw.get("action")
            if action is not None and (not isinstance(action, str) or not action):
                hint = (
                    f' (quote it: action: "{str(action).lower()}")'
                    if isinstance(action, bool | int | float)
                    else ""
                )
                self.add(f"{path}.action", f"must be a non-empty string, got {show(action)}{hint}")
                action = None
            condition = self.expression(raw.get("condition"), f"{path}.condition", cache)
            transform = self.expression(raw.get("transform"), f"{path}.transform", cache)
            source, target = ends
            if source is None or target is None:
                continue
            edges.append((EdgeDef(source, target, action, condition, transform, index), path))
        return edges
