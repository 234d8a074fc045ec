"""The blueprint model and the graph facts the engine needs (start nodes, joins, loop bodies).

Parsing and validation of documents live in ``loading/``; this module only describes a blueprint that is
already valid, so the engine can trust it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from .expressions import Expression

#: Node types the engine implements itself; a registry entry of the same name is refused at load.
BUILTINS = frozenset({"loop-controller", "batch", "subflow", "sleep", "wait"})

CONTINUE = "continue"
BREAK = "break"


class JoinStrategy(StrEnum):
    ALL = "all"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    max_retries: int = 1  # total attempts (Flowcraft meaning)
    retry_delay_ms: int = 0  # before attempt 2; doubles for each later attempt
    timeout_ms: int | None = None  # per attempt
    fallback: str | None = None  # id of the node that stands in after the last failed attempt
    join_strategy: JoinStrategy = JoinStrategy.ALL


#: ``params.maxIterations`` when a loop-controller does not give it
DEFAULT_MAX_ITERATIONS = 1000


@dataclass(frozen=True, slots=True)
class LoopSpec:
    """``loop-controller``: continue while ``condition`` holds (always, when None) and fewer than
    ``max_iterations`` iterations ran."""

    condition: Expression | None = None
    max_iterations: int = DEFAULT_MAX_ITERATIONS


@dataclass(frozen=True, slots=True)
class SleepSpec:
    """``sleep``: ``params.duration`` in milliseconds."""

    duration_ms: int


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """``batch``: ``worker`` is the registered node run once per item of the input list."""

    worker: str


@dataclass(frozen=True, slots=True)
class SubflowSpec:
    """``subflow``: run blueprint ``blueprint_id`` as a child run.

    ``inputs`` maps child context key -> parent key, ``outputs`` parent context key -> child node. None (not
    given) and an empty mapping differ: an empty ``inputs`` seeds the child with ``{}`` instead of the node's
    input, and an empty ``outputs`` makes the child's final context the node's output.
    """

    blueprint_id: str
    inputs: Mapping[str, str] | None = None
    outputs: Mapping[str, str] | None = None


#: the params of a built-in, parsed once at load (``wait`` has none)
BuiltinSpec = LoopSpec | SleepSpec | BatchSpec | SubflowSpec


@dataclass(frozen=True, slots=True)
class NodeDef:
    """One node. ``params`` is the document's, as the node function receives it; ``spec`` is the same params
    parsed for a built-in that has any (None for ``wait`` and registered nodes)."""

    id: str
    uses: str
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: str | Mapping[str, str] | None = None
    config: NodeConfig = NodeConfig()
    spec: BuiltinSpec | None = None


@dataclass(frozen=True, slots=True)
class EdgeDef:
    source: str
    target: str
    action: str | None = None
    condition: Expression | None = None
    transform: Expression | None = None
    index: int = 0  # position in the document, for messages and Mermaid


@dataclass(eq=False)
class Blueprint:
    """A validated blueprint. ``raw`` is the document as loaded; it defines the default version."""

    id: str
    nodes: tuple[NodeDef, ...]
    edges: tuple[EdgeDef, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    @cached_property
    def version(self) -> str:
        declared = self.metadata.get("version")
        if declared is not None and str(declared) != "":
            return str(declared)
        canonical = json.dumps(self.raw, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @cached_property
    def node_map(self) -> dict[str, NodeDef]:
        return {n.id: n for n in self.nodes}

    @cached_property
    def order(self) -> dict[str, int]:
        return {n.id: i for i, n in enumerate(self.nodes)}

    @cached_property
    def out_edges(self) -> dict[str, tuple[EdgeDef, ...]]:
        out: dict[str, list[EdgeDef]] = {n.id: [] for n in self.nodes}
        for e in self.edges:
            out[e.source].append(e)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def in_edges(self) -> dict[str, tuple[EdgeDef, ...]]:
        inc: dict[str, list[EdgeDef]] = {n.id: [] for n in self.nodes}
        for e in self.edges:
            inc[e.target].append(e)
        return {k: tuple(v) for k, v in inc.items()}

    @cached_property
    def predecessors(self) -> dict[str, tuple[str, ...]]:
        """Distinct source nodes per target: a join waits for nodes, not edges (two edges from one
        source count once)."""
        return {k: tuple(dict.fromkeys(e.source for e in v)) for k, v in self.in_edges.items()}

    @cached_property
    def fallback_nodes(self) -> frozenset[str]:
        return frozenset(n.config.fallback for n in self.nodes if n.config.fallback)

    @cached_property
    def start_nodes(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes if not self.in_edges[n.id] and n.id not in self.fallback_nodes)

    @cached_property
    def terminal_nodes(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes if not self.out_edges[n.id] and n.id not in self.fallback_nodes)

    def is_loop_controller(self, node_id: str) -> bool:
        return self.node_map[node_id].uses == "loop-controller"

    @cached_property
    def loop_bodies(self) -> dict[str, frozenset[str]]:
        """Per loop-controller: the nodes reachable from its ``continue`` targets without passing
        through the controller. A ``continue`` starts a new iteration of exactly these nodes."""
        bodies: dict[str, frozenset[str]] = {}
        for n in self.nodes:
            if n.uses != "loop-controller":
                continue
            seen: set[str] = set()
            stack = [e.target for e in self.out_edges[n.id] if e.action == CONTINUE]
            while stack:
                cur = stack.pop()
                if cur == n.id or cur in seen:
                    continue
                seen.add(cur)
                stack.extend(e.target for e in self.out_edges[cur])
            bodies[n.id] = frozenset(seen)
        return bodies

    @cached_property
    def loop_entry_sources(self) -> dict[str, frozenset[str]]:
        """Per loop-controller: predecessors outside its body (the entry edges). The controller is
        skipped only when every entry edge is not taken; loop-back edges never skip it."""
        return {
            lc: frozenset(p for p in self.predecessors[lc] if p not in body)
            for lc, body in self.loop_bodies.items()
        }

    @cached_property
    def loops_containing(self) -> dict[str, tuple[str, ...]]:
        """Per node: the loop-controllers whose body it belongs to, innermost (smallest body) first, so an
        inner loop takes its next iteration before the outer one looks at whether its body is idle."""
        out: dict[str, list[str]] = {}
        for lc, body in self.loop_bodies.items():
            for n in body:
                out.setdefault(n, []).append(lc)
        return {k: tuple(sorted(v, key=lambda lc: len(self.loop_bodies[lc]))) for k, v in out.items()}

    @cached_property
    def inner_loops(self) -> dict[str, tuple[str, ...]]:
        """Per loop-controller: the loop-controllers inside its body."""
        return {
            lc: tuple(n for n in body if self.node_map[n].uses == "loop-controller")
            for lc, body in self.loop_bodies.items()
        }
