"""Run a scenario through either runtime: in-process (``memory``) or real arq workers over a real
redis-server (``arq``). Scenario tests take the ``flow`` fixture and never know which one they got."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from flowcraft_cli.blueprint import Blueprint
from flowcraft_cli.loading import parse_blueprint
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

    def result(self, run_id: str) -> RunResult:
        return self.loop.run_until_complete(self.runtime.result(run_id))

    def cancel(self, run_id: str) -> bool:
        return self.loop.run_until_complete(self.runtime.cancel(run_id))

    def retry(self, run_id: str) -> RunResult:
        return self.loop.run_until_complete(self.runtime.retry(run_id))

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


class ArqSession:
    """Real arq workers (in-process, burst mode) over a real redis-server."""

    kind = "arq"

    def __init__(self, blueprints: dict[str, Blueprint], registry: NodeRegistry, url: str, **adapter_kw: Any) -> None:
        import uuid

        from redis.asyncio import Redis

        from flowcraft_cli.distributed.adapter import ArqAdapter

        self.loop = asyncio.new_event_loop()
        self.first_blueprint_id = next(iter(blueprints))
        self.url = url
        self.queue_name = f"test-queue-{uuid.uuid4().hex[:8]}"

        async def make() -> Any:
            redis = Redis.from_url(url)
            return ArqAdapter(connection=redis, queue_name=self.queue_name,
                              runtime_options={"registry": registry, "blueprints": blueprints},
                              **{"job_timeout_s": 30, **adapter_kw})

        self.adapter = self.loop.run_until_complete(make())

    def _drain(self) -> None:
        self.loop.run_until_complete(self.adapter.start(burst=True))

    def _result(self, run_id: str) -> RunResult:
        view = self.loop.run_until_complete(self.adapter.inspect(run_id))
        return RunResult(run_id, view.blueprint_id, view.status, view.reason, view.context, view.outputs, view)

    def run(self, blueprint_id: str, run_input: Any = None, **kw: Any) -> RunResult:
        run_id = self.loop.run_until_complete(self.adapter.start_run(blueprint_id, run_input, **kw))
        self._drain()
        return self._result(run_id)

    def resume(self, run_id: str, node_id: str | None = None, **kw: Any) -> RunResult:
        self.loop.run_until_complete(self.adapter.resume(run_id, node_id, **kw))
        self._drain()
        return self._result(run_id)

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return self.loop.run_until_complete(self.adapter.store.read_events(run_id))

    def result(self, run_id: str) -> RunResult:
        self._drain()
        return self._result(run_id)

    def cancel(self, run_id: str) -> bool:
        return self.loop.run_until_complete(self.adapter.cancel(run_id))

    def retry(self, run_id: str) -> RunResult:
        self.loop.run_until_complete(self.adapter.retry(run_id))
        self._drain()
        return self._result(run_id)

    def close(self) -> None:
        async def shut() -> None:
            await self.adapter.close()
            await self.adapter.redis.aclose()

        self.loop.run_until_complete(shut())
        self.loop.close()


def make_adapter(redis: Any, docs: list[str | dict], nodes: Mapping[str, Callable[..., Any]], **kw: Any) -> Any:
    """An ArqAdapter on ``redis`` for scenario blueprints and node functions (tests that drive it by hand)."""
    from flowcraft_cli.distributed.adapter import ArqAdapter

    registry = make_registry(nodes)
    return ArqAdapter(connection=redis, queue_name=kw.pop("queue_name", "dup-queue"),
                      runtime_options={"registry": registry, "blueprints": make_blueprints(docs, registry)}, **kw)


def count_commits(adapter: Any) -> list[int]:
    """Count an adapter's store's commit calls (one Lua call each) from now on: the list's one item."""
    calls = [0]
    apply = adapter.store._apply

    async def counted(keys: list[Any], args: list[Any]) -> Any:
        calls[0] += 1
        return await apply(keys, args)

    adapter.store._apply = counted
    return calls


def idle_s(redis_sync: Any, run_id: str) -> float:
    """Seconds without progress, as the reconciler judges a run: its progress key's idle time, else (no step
    wrote one yet: a run's start writes none) the time since the run was created."""
    import time

    from flowcraft_cli.distributed.keys import kind_key, progress_key

    idle = redis_sync.object("idletime", progress_key(run_id))
    if idle is not None:
        return float(idle)
    created = redis_sync.hget(kind_key("run", run_id), "created_at")
    return 0.0 if created is None else time.time() - int(created) / 1000
