"""Read blueprint files and turn decoded documents into validated :class:`Blueprint` models.

Validation collects every problem before raising, so one :class:`BlueprintError` lists them all, each line
``FILE: path.in.document: message`` (CONTRACT §3). Graph checks (cycles, reachability) are iterative and linear
in nodes + edges: a 10,000-node chain validates without recursion or quadratic scans.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .blueprint import BREAK, BUILTINS, CONTINUE, Blueprint, EdgeDef, JoinStrategy, NodeConfig, NodeDef
from .errors import BlueprintError, ExpressionError
from .expressions import Expression, compile_expression

if TYPE_CHECKING:
    from .registry import NodeRegistry

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

BLUEPRINT_SUFFIXES = (".yaml", ".yml", ".json")

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
_DURATION_RE = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_SIMPLE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_MISSING: Any = object()


# --------------------------------------------------------------------------------------------- helpers


def _did_you_mean(word: object, candidates: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _show(value: Any, limit: int = 60) -> str:
    """A user-facing rendering of a bad value: strings quoted, the rest as JSON, long values cut."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not (isinstance(value, float) and not math.isfinite(value))
    )


def _key_path(parent: str, key: Any) -> str:
    if isinstance(key, str) and _SIMPLE_KEY_RE.match(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{key!r}]"


def _list_names(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def parse_duration_ms(value: Any) -> int:
    """A ``sleep`` duration in milliseconds: a number >= 0 (ms) or a string like ``500ms``, ``30s``, ``5m``,
    ``2h``, ``1d``. Raises ValueError with a message meant for users."""
    if _is_number(value):
        if value < 0:
            raise ValueError(f"duration must be >= 0 milliseconds, got {_show(value)}")
        return math.ceil(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return int(m.group(1)) * _DURATION_UNITS_MS[m.group(2)]
    raise ValueError(
        f"invalid duration {_show(value)}: expected milliseconds (a number >= 0) "
        "or a string like '500ms', '30s', '5m', '2h' or '1d'"
    )


@functools.lru_cache(maxsize=4096)
def _compile_cached(source: str) -> Expression:
    return compile_expression(source)


def loop_condition(node: NodeDef) -> Expression | None:
    """The compiled ``params.condition`` of a loop-controller (None when absent), cached by source text."""
    source = node.params.get("condition")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ExpressionError(f"loop-controller {node.id!r}: params.condition must be a string expression")
    return _compile_cached(source)


# --------------------------------------------------------------------------------------------- parsing


@dataclass(slots=True)
class _NodeDraft:
    path: str
    id: str
    uses: str | None
    params: Mapping[str, Any]
    inputs: str | Mapping[str, str] | None
    config: dict[str, Any]
    fallback_path: str | None  # where `fallback` was written, for messages


class _Parser:
    def __init__(
        self,
        source: str,
        registry: NodeRegistry | None,
        known_blueprint_ids: Collection[str] | None,
    ) -> None:
        self.source = source
        self.registry = registry
        self.known_blueprint_ids = known_blueprint_ids
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path}: {message}")

    def unknown_key(self, parent: str, key: Any, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        self.add(
            _key_path(parent, key),
            f"unknown key{_did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}",
        )

    def required_str(self, data: Mapping[str, Any], key: str, parent: str, what: str) -> str | None:
        value = data.get(key, _MISSING)
        path = f"{parent}.{key}"
        if value is _MISSING or value is None:
            self.add(path, f"missing: {what}")
        elif not isinstance(value, str):
            self.add(path, f"must be a string, got {_show(value)}")
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
            return [(_key_path(key, k), v) for k, v in value.items()]
        if isinstance(value, list | tuple):
            return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        self.add(key, f"must be a list (or a mapping) of {key}, got {_type_name(value)}")
        return []

    def expression(self, value: Any, path: str, cache: dict[str, Expression]) -> Expression | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.add(path, f"must be a string expression, got {_show(value)}")
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
            what = "empty" if data is None else _type_name(data)
            self.add("top level", f"a blueprint must be a mapping with 'nodes' and 'edges', got {what}")
            return None
        for key in data:
            if key not in _TOP_KEYS:
                self.unknown_key("", key, _TOP_KEYS)

        bp_id = self.parse_id(data, default_id)
        metadata = data.get("metadata")
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, Mapping):
            self.add("metadata", f"must be a mapping, got {_type_name(data['metadata'])}")
            metadata = {}

        if data.get("nodes") is None:
            self.add("nodes", "missing: a blueprint needs a list of nodes")
        node_entries = self.entries(data.get("nodes"), "nodes")
        if isinstance(data.get("nodes"), Mapping | list | tuple) and not node_entries:
            self.add("nodes", "is empty: a blueprint needs at least one node")
        drafts = self.parse_nodes(node_entries)
        edges = self.parse_edges(self.entries(data.get("edges"), "edges"), drafts)
        self.check_graph(drafts, edges)

        if self.problems or bp_id is None:
            return None
        nodes = tuple(
            NodeDef(
                id=d.id,
                uses=d.uses or "",
                params=d.params,
                inputs=d.inputs,
                config=NodeConfig(**d.config),
            )
            for d in drafts.values()
        )
        return Blueprint(
            id=bp_id,
            nodes=nodes,
            edges=tuple(e for e, _ in edges),
            metadata=metadata,
            raw=data,
            source=self.source,
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
            self.add("id", f'must be a string, got {_show(value)} (quote it: id: "{value}")')
        elif not value.strip():
            self.add("id", "must not be empty")
        else:
            return value
        return None

    # -- nodes -----------------------------------------------------------------------------------

    def parse_nodes(self, entries: list[tuple[str, Any]]) -> dict[str, _NodeDraft]:
        drafts: dict[str, _NodeDraft] = {}
        for path, raw in entries:
            if not isinstance(raw, Mapping):
                self.add(path, f"a node must be a mapping with 'id' and 'uses', got {_type_name(raw)}")
                continue
            for key in raw:
                if key not in _NODE_KEYS and key not in _IGNORED_NODE_KEYS:
                    self.unknown_key(path, key, _NODE_KEYS)
            node_id = self.required_str(raw, "id", path, "every node needs a unique id")
            uses = self.required_str(raw, "uses", path, "a registered node name or a built-in")
            params = raw.get("params")
            if params is None:
                params = {}
            elif not isinstance(params, Mapping):
                self.add(f"{path}.params", f"must be a mapping, got {_type_name(params)}")
                params = {}
            inputs = self.parse_inputs(raw.get("inputs"), f"{path}.inputs")
            config, fallback_path = self.parse_config(raw.get("config"), f"{path}.config")
            if uses is not None:
                self.check_uses(uses, params, path)
            if node_id is None:
                continue
            first = drafts.get(node_id)
            if first is not None:
                self.add(f"{path}.id", f"duplicate node id {node_id!r} (first defined at {first.path})")
                continue
            drafts[node_id] = _NodeDraft(path, node_id, uses, params, inputs, config, fallback_path)
        return drafts

    def parse_inputs(self, value: Any, path: str) -> str | Mapping[str, str] | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, Mapping):
            ok = True
            for name, ref in value.items():
                if not isinstance(name, str):
                    self.add(path, f"input names must be strings, got {_show(name)}")
                    ok = False
                elif not isinstance(ref, str):
                    self.add(
                        _key_path(path, name),
                        f"must be a string (a context key, node id or 'node.path'), got {_show(ref)}",
                    )
                    ok = False
            return value if ok else None
        self.add(
            path,
            f"must be a string or a mapping of {{name: reference}}, got {_type_name(value)} {_show(value)}",
        )
        return None

    def parse_config(self, value: Any, path: str) -> tuple[dict[str, Any], str | None]:
        config: dict[str, Any] = {}
        if value is None:
            return config, None
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping, got {_type_name(value)}")
            return config, None
        given: dict[str, str] = {}
        for key in value:
            name = _CONFIG_KEYS.get(key) if isinstance(key, str) else None
            if name is None:
                self.unknown_key(
                    path, key, ("maxRetries", "retryDelay", "timeout", "fallback", "joinStrategy")
                )
            elif name in given:
                self.add(_key_path(path, key), f"given twice, as {given[name]!r} and {key!r}")
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
                        f"must be an integer >= 1, got {_show(v)} "
                        "(it counts total attempts: 1 = a single try, 3 = up to two retries)",
                    )
            elif name == "retry_delay":
                if _is_number(v) and v >= 0:
                    config["retry_delay_ms"] = math.ceil(v)
                else:
                    self.add(kpath, f"must be a number of milliseconds >= 0, got {_show(v)}")
            elif name == "timeout":
                if _is_number(v) and v > 0:
                    config["timeout_ms"] = math.ceil(v)
                else:
                    self.add(kpath, f"must be a number of milliseconds > 0, got {_show(v)}")
            elif name == "fallback":
                if isinstance(v, str) and v:
                    config["fallback"] = v
                    fallback_path = kpath
                else:
                    self.add(kpath, f"must be the id of another node, got {_show(v)}")
            elif name == "join_strategy":
                if v in ("all", "any"):
                    config["join_strategy"] = JoinStrategy(v)
                else:
                    self.add(kpath, f"must be 'all' or 'any', got {_show(v)}")
        return config, fallback_path

    def check_uses(self, uses: str, params: Mapping[str, Any], path: str) -> None:
        if uses == "batch":
            self.check_batch(params, f"{path}.params")
        elif uses == "subflow":
            self.check_subflow(params, f"{path}.params")
        elif uses == "sleep":
            duration = params.get("duration")
            if duration is None:
                self.add(
                    f"{path}.params.duration",
                    "missing: a sleep node needs a duration (ms, or '30s', '5m', ...)",
                )
            else:
                try:
                    parse_duration_ms(duration)
                except ValueError as e:
                    self.add(f"{path}.params.duration", str(e))
        elif uses == "loop-controller":
            self.check_loop_params(params, f"{path}.params")
        elif uses not in BUILTINS and self.registry is not None and uses not in self.registry:
            if uses in _FLOWCRAFT_ONLY:
                hint = (
                    f"; it is a Flowcraft built-in that flowcraft does not implement: {_FLOWCRAFT_ONLY[uses]}"
                )
            else:
                hint = _did_you_mean(uses, [*self.registry.names(), *sorted(BUILTINS)])
                if not hint:
                    hint = " (is the module that defines it listed under `registry`?)"
            self.add(f"{path}.uses", f"{uses!r} is not registered{hint}")

    def check_batch(self, params: Mapping[str, Any], path: str) -> None:
        worker = params.get("worker")
        if worker is None:
            self.add(f"{path}.worker", "missing: a batch node needs the name of the node to run per item")
        elif not isinstance(worker, str) or not worker:
            self.add(f"{path}.worker", f"must be a node name, got {_show(worker)}")
        elif worker in BUILTINS:
            self.add(f"{path}.worker", f"{worker!r} is a built-in; a batch worker must be a registered node")
        elif self.registry is not None and worker not in self.registry:
            self.add(
                f"{path}.worker",
                f"{worker!r} is not registered{_did_you_mean(worker, self.registry.names())}",
            )

    def check_subflow(self, params: Mapping[str, Any], path: str) -> None:
        bid = params.get("blueprintId")
        if bid is None:
            self.add(f"{path}.blueprintId", "missing: a subflow node needs the id of the blueprint to run")
        elif not isinstance(bid, str) or not bid:
            self.add(f"{path}.blueprintId", f"must be a blueprint id string, got {_show(bid)} (quote it)")
        elif self.known_blueprint_ids is not None and bid not in self.known_blueprint_ids:
            hint = _did_you_mean(bid, sorted(self.known_blueprint_ids))
            self.add(f"{path}.blueprintId", f"unknown blueprint {bid!r}{hint}")
        for key in ("inputs", "outputs"):
            value = params.get(key)
            if value is None:
                continue
            if not isinstance(value, Mapping):
                self.add(f"{path}.{key}", f"must be a mapping of {{key: key}}, got {_type_name(value)}")
                continue
            for k, v in value.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    self.add(_key_path(f"{path}.{key}", k), f"must map a string to a string, got {_show(v)}")

    def check_loop_params(self, params: Mapping[str, Any], path: str) -> None:
        condition = params.get("condition")
        if condition is not None:
            if not isinstance(condition, str):
                self.add(f"{path}.condition", f"must be a string expression, got {_show(condition)}")
            else:
                try:
                    _compile_cached(condition)
                except ExpressionError as e:
                    self.add(f"{path}.condition", str(e))
        max_iter = params.get("maxIterations")
        if max_iter is not None and not (
            isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 1
        ):
            self.add(f"{path}.maxIterations", f"must be an integer >= 1, got {_show(max_iter)}")

    # -- edges -----------------------------------------------------------------------------------

    def parse_edges(
        self, entries: list[tuple[str, Any]], drafts: dict[str, _NodeDraft]
    ) -> list[tuple[EdgeDef, str]]:
        """Edges whose both ends exist, with their document path; broken edges only add problems."""
        edges: list[tuple[EdgeDef, str]] = []
        cache: dict[str, Expression] = {}
        for index, (path, raw) in enumerate(entries):
            if not isinstance(raw, Mapping):
                self.add(path, f"an edge must be a mapping with 'source' and 'target', got {_type_name(raw)}")
                continue
            for key in raw:
                if key not in _EDGE_KEYS:
                    self.unknown_key(path, key, _EDGE_KEYS)
            ends = []
            for key in ("source", "target"):
                ref = self.required_str(raw, key, path, f"the id of the edge's {key} node")
                if ref is not None and ref not in drafts:
                    self.add(f"{path}.{key}", f"{ref!r} is not a node{_did_you_mean(ref, drafts)}")
                    ref = None
                ends.append(ref)
            action = raw.get("action")
            if action is not None and (not isinstance(action, str) or not action):
                hint = (
                    f' (quote it: action: "{str(action).lower()}")'
                    if isinstance(action, bool | int | float)
                    else ""
                )
                self.add(f"{path}.action", f"must be a non-empty string, got {_show(action)}{hint}")
                action = None
            condition = self.expression(raw.get("condition"), f"{path}.condition", cache)
            transform = self.expression(raw.get("transform"), f"{path}.transform", cache)
            source, target = ends
            if source is None or target is None:
                continue
            edges.append((EdgeDef(source, target, action, condition, transform, index), path))
        return edges

    # -- graph -----------------------------------------------------------------------------------

    def check_graph(self, drafts: dict[str, _NodeDraft], edges: list[tuple[EdgeDef, str]]) -> None:
        out: dict[str, list[tuple[EdgeDef, str]]] = {nid: [] for nid in drafts}
        incoming: dict[str, list[EdgeDef]] = {nid: [] for nid in drafts}
        for edge, path in edges:
            out[edge.source].append((edge, path))
            incoming[edge.target].append(edge)

        fallback_of: dict[str, list[str]] = {}  # fallback node -> nodes it stands in for
        for d in drafts.values():
            fb = d.config.get("fallback")
            if fb is None:
                continue
            if fb == d.id:
                self.add(
                    d.fallback_path or d.path, f"{fb!r} is the node itself; a fallback must be another node"
                )
                del d.config["fallback"]
            elif fb not in drafts:
                self.add(d.fallback_path or d.path, f"{fb!r} is not a node{_did_you_mean(fb, drafts)}")
                del d.config["fallback"]
            else:
                fallback_of.setdefault(fb, []).append(d.id)
                target = drafts[fb]
                if target.uses in BUILTINS:
                    self.add(
                        d.fallback_path or d.path,
                        f"fallback node {fb!r} uses the built-in {target.uses!r}; a fallback must be a registered "
                        "node function",
                    )
                elif target.config.get("fallback") is not None:
                    self.add(
                        d.fallback_path or d.path,
                        f"fallback node {fb!r} has a fallback of its own ({target.config['fallback']!r}); "
                        "fallbacks do not chain: give {d.id!r} the last resort directly".replace("{d.id!r}", repr(d.id)),
                    )
                if incoming[fb]:
                    sources = _list_names(dict.fromkeys(e.source for e in incoming[fb]))
                    self.add(
                        d.fallback_path or d.path,
                        f"fallback node {fb!r} has incoming edges (from {sources}); a fallback node stands in "
                        "for another node and is never a start node or an edge target: remove those edges",
                    )
        self.check_fallback_chains(drafts)

        for d in drafts.values():
            if d.uses == "loop-controller":
                self.check_loop_edges(d, out[d.id])

        self.check_cycles(drafts, out)

        if not drafts:
            return
        starts = [nid for nid in drafts if not incoming[nid] and nid not in fallback_of]
        if not starts:
            extra = "" if not fallback_of else " or is a fallback node"
            self.add(
                "nodes",
                f"no start node: every node has an incoming edge{extra} "
                "(a loop needs an entry edge from outside into its loop-controller)",
            )
            return
        self.check_reachable(drafts, out, starts)

    def check_fallback_chains(self, drafts: dict[str, _NodeDraft]) -> None:
        state: dict[str, int] = {}  # 1 = on the current chain, 2 = done
        for start in drafts:
            chain: list[str] = []
            cur: str | None = start
            while cur is not None and state.get(cur) is None:
                state[cur] = 1
                chain.append(cur)
                cur = drafts[cur].config.get("fallback")
            if cur is not None and state.get(cur) == 1:
                loop = chain[chain.index(cur) :] + [cur]
                d = drafts[cur]
                self.add(d.fallback_path or d.path, f"fallback chain loops: {' -> '.join(loop)}")
            for nid in chain:
                state[nid] = 2

    def check_loop_edges(self, d: _NodeDraft, out: list[tuple[EdgeDef, str]]) -> None:
        if not any(e.action == CONTINUE for e, _ in out):
            self.add(
                d.path,
                f"loop-controller {d.id!r} has no outgoing edge with action 'continue' "
                "(add an edge to the first node of the loop body with action: continue)",
            )
        for e, path in out:
            if e.action is not None and e.action not in (CONTINUE, BREAK):
                self.add(
                    f"{path}.action",
                    f"{e.action!r} is never taken: a loop-controller returns only 'continue' or 'break'",
                )

    def check_cycles(self, drafts: dict[str, _NodeDraft], out: dict[str, list[tuple[EdgeDef, str]]]) -> None:
        """Cycles left after removing every loop-controller are errors; one reported per strongly connected
        component, as its shortest cycle through the component's first node."""
        succ: dict[str, list[tuple[str, int]]] = {}
        for nid, d in drafts.items():
            if d.uses == "loop-controller":
                continue
            succ[nid] = [
                (e.target, i)
                for i, (e, _) in enumerate(out[nid])
                if drafts[e.target].uses != "loop-controller"
            ]
        order = {nid: i for i, nid in enumerate(drafts)}
        for comp in _strongly_connected(succ):
            if len(comp) == 1:
                nid = comp[0]
                self_edges = [i for t, i in succ[nid] if t == nid]
                if not self_edges:
                    continue
                cycle, closing = [nid, nid], out[nid][self_edges[0]][1]
            else:
                members = set(comp)
                start = min(comp, key=order.__getitem__)
                cycle, closing = _cycle_through(start, members, succ, out)
            self.add(
                closing,
                f"cycle {' -> '.join(cycle)} does not pass through a loop-controller "
                "(route the loop-back edge into a 'loop-controller' node, which continues or breaks the loop)",
            )

    def check_reachable(
        self,
        drafts: dict[str, _NodeDraft],
        out: dict[str, list[tuple[EdgeDef, str]]],
        starts: list[str],
    ) -> None:
        seen = set(starts)
        queue = deque(starts)
        while queue:
            nid = queue.popleft()
            nexts = [e.target for e, _ in out[nid]]
            fb = drafts[nid].config.get("fallback")
            if fb is not None:
                nexts.append(fb)
            for t in nexts:
                if t not in seen:
                    seen.add(t)
                    queue.append(t)
        for nid, d in drafts.items():
            if nid not in seen:
                self.add(
                    d.path,
                    f"node {nid!r} is unreachable: no path leads to it from a start node "
                    f"(start nodes: {_list_names(starts)})",
                )


def _strongly_connected(succ: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (a 10,000-node chain must not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for root in succ:
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(succ[root]))]
        while work:
            v, it = work[-1]
            descended = False
            for w, _ in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ[w])))
                    descended = True
                    break
                if w in on_stack and index[w] < low[v]:
                    low[v] = index[w]
            if descended:
                continue
            work.pop()
            if work:
                u = work[-1][0]
                if low[v] < low[u]:
                    low[u] = low[v]
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                comps.append(comp)
    return comps


def _cycle_through(
    start: str,
    members: set[str],
    succ: dict[str, list[tuple[str, int]]],
    out: dict[str, list[tuple[EdgeDef, str]]],
) -> tuple[list[str], str]:
    """Shortest cycle from ``start`` back to itself inside one component, and the path of its closing edge."""
    parent: dict[str, str] = {start: start}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for t, i in succ[v]:
            if t not in members:
                continue
            if t == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                path.reverse()
                return [*path, start], out[v][i][1]
            if t not in parent:
                parent[t] = v
                queue.append(t)
    raise AssertionError("a strongly connected component always has a cycle")  # pragma: no cover


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
        raise BlueprintError(parser.problems or [f"{source}: top level: not a valid blueprint"])
    return blueprint


# --------------------------------------------------------------------------------------------- files


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


def _decode_json(text: str, source: str) -> tuple[Any, list[str]]:
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


def _read_document(path: Path, source: str) -> tuple[Any, list[str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        return None, [f"{source}: not UTF-8 text ({e.reason} at byte {e.start})"]
    except OSError as e:
        return None, [f"{source}: cannot read: {e.strerror or e}"]
    if path.suffix.lower() == ".json":
        return _decode_json(text, source)
    return decode_yaml(text, source)


def load_blueprint_file(
    path: str | os.PathLike[str],
    *,
    registry: NodeRegistry | None = None,
    known_blueprint_ids: Collection[str] | None = None,
) -> Blueprint:
    """Read and validate one YAML/JSON blueprint file; its id defaults to the file name without extension."""
    source = os.fspath(path)
    p = Path(source)
    if not p.is_file():
        raise BlueprintError([f"{source}: no such file"])
    data, problems = _read_document(p, source)
    if problems:
        raise BlueprintError(problems)
    return parse_blueprint(
        data, source=source, default_id=p.stem, registry=registry, known_blueprint_ids=known_blueprint_ids
    )


def _collect_files(paths: Iterable[str | os.PathLike[str]], problems: list[str]) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(p: Path, shown: str) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append((p, shown))

    for given in paths:
        shown = os.fspath(given)
        p = Path(shown)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in BLUEPRINT_SUFFIXES
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            for f in found:
                add(f, os.path.join(shown, *f.relative_to(p).parts))
        elif p.is_file():
            if p.suffix.lower() not in BLUEPRINT_SUFFIXES:
                problems.append(f"{shown}: not a blueprint file (expected .yaml, .yml or .json)")
            else:
                add(p, shown)
        else:
            problems.append(f"{shown}: no such file or directory")
    return files


def load_blueprints(
    paths: Iterable[str | os.PathLike[str]],
    registry: NodeRegistry | None = None,
) -> dict[str, Blueprint]:
    """Load every blueprint from files and folders (searched recursively for *.yaml, *.yml, *.json).

    Problems from all files are collected into one BlueprintError: unreadable or invalid files, duplicate
    blueprint ids across files, subflows naming a blueprint that was not loaded.
    """
    blueprints, problems, _ = load_blueprints_lenient(paths, registry)
    if problems:
        raise BlueprintError(problems)
    return blueprints


def load_blueprints_lenient(
    paths: Iterable[str | os.PathLike[str]],
    registry: NodeRegistry | None = None,
) -> tuple[dict[str, Blueprint], list[str], set[str]]:
    """Like :func:`load_blueprints`, but returns ``(blueprints that are valid, problems, ids with a problem)``
    instead of raising: a command that runs one blueprint need not be stopped by a broken file elsewhere."""
    problems: list[str] = []
    broken: set[str] = set()
    documents: list[tuple[str, str, Any]] = []  # (source, id, data) of files that decoded
    known: set[str] = set()
    for path, source in _collect_files(paths, problems):
        data, file_problems = _read_document(path, source)
        declared = data.get("id") if isinstance(data, Mapping) else None
        blueprint_id = declared if isinstance(declared, str) and declared else path.stem
        known.add(blueprint_id)  # even for a broken file, so its subflow callers get no second complaint
        if file_problems:
            problems.extend(file_problems)
            broken.add(blueprint_id)
        else:
            documents.append((source, blueprint_id, data))

    blueprints: dict[str, Blueprint] = {}
    defined_in: dict[str, str] = {}
    for source, blueprint_id, data in documents:
        stem = Path(source).stem
        try:
            bp = parse_blueprint(
                data, source=source, default_id=stem, registry=registry, known_blueprint_ids=known
            )
        except BlueprintError as e:
            problems.extend(e.problems)
            broken.add(blueprint_id)
            bp = None
        first = defined_in.get(blueprint_id)
        if first is not None:
            problems.append(
                f"{source}: id: duplicate blueprint id {blueprint_id!r} (also defined in {first})"
            )
            broken.add(blueprint_id)
            continue
        defined_in[blueprint_id] = source
        if bp is not None:
            blueprints[bp.id] = bp
    return {k: v for k, v in blueprints.items() if k not in broken}, problems, broken
