"""Run a scenario through either runtime: in-process (``memory``) or real arq workers over a real
redis-server (``arq``). Scenario tests take the ``flow`` fixture and never know which one they got."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from flowcraft_cli.blueprint import Blueprint
from flowcraft_cli.loader import parse_blueprint
from flowcraft_cli.registry import NodeRegistry
from flowcraft_cli.runtime import FlowRuntime, RunResult


def make_blueprints(docs: list[str | dict], registry: NodeRegistry) -> dict[str, Blueprint]:
    out: dict[str, Blueprint] = {}
    for i, doc in enumerate(docs):
        data = yaml.safe_load(doc) if isinstance(doc, str) else doc
        bp = parse_blueprint(data, source=f"<scenario {i}>", registry=registry)
        out[bp.id] = bp
    return out


def make_registry(nodes: Mapping[str, Callable[..., Any]]) -> NodeRegistry:
    reg = NodeRegistry()
    for name, fn in nodes.items():
        reg.register(name, fn)
    return reg


class MemorySession:
    kind = "memory"

    def __init__(self, blueprints: dict[str, Blueprint], registry: NodeRegistry) -> None:
        self.loop = asyncio.new_event_loop()
        self.first_blueprint_id = next(iter(blueprints))
        self.runtime = FlowRuntime(blueprints, registry)

    def run(self, blueprint_id: str, run_input: Any = None, **kw: Any) -> RunResult:
        return self.loop.run_until_complete(self.runtime.run(blueprint_id, run_input, **kw))

    def resume(self, run_id: str, node_id: str | None = None, **kw: Any) -> RunResult:
        return self.loop.run_until_complete(self.runtime.resume(run_id, node_id, **kw))

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return self.loop.run_until_complete(self.runtime.store.read_events(run_id))

    def close(self) -> None:
        self.loop.close()


class Flow:
    """The ``flow`` fixture: ``flow.session(docs, nodes)`` gives a session on the chosen runtime."""

    def __init__(self, kind: str, factory: Callable[..., Any]) -> None:
        self.kind = kind
        self._factory = factory
        self._sessions: list[Any] = []

    def session(self, docs: list[str | dict] | str, nodes: Mapping[str, Callable[..., Any]] | None = None) -> Any:
        if isinstance(docs, str | dict):
            docs = [docs]
        registry = make_registry(nodes or {})
        s = self._factory(make_blueprints(list(docs), registry), registry)
        self._sessions.append(s)
        return s

    def run(self, docs: list[str | dict] | str, nodes: Mapping[str, Callable[..., Any]] | None = None,
            run_input: Any = None, blueprint_id: str | None = None) -> RunResult:
        s = self.session(docs, nodes)
        return s.run(blueprint_id or s.first_blueprint_id, run_input)

    def close(self) -> None:
        for s in self._sessions:
            s.close()
