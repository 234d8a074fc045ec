"""What a step reads outside any transaction: a context key, a node's input, the scope an expression
sees, and from those the route a node's result takes. Read once, decided, then committed (step.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..blueprint import Blueprint, EdgeDef, NodeDef
from ..node_api import _MISSING
from ..store import MISSING, STATE, Store
from .routing import Route, expression_names, route_edges


async def read_context(store: Store, run_id: str, key: str) -> Any:
    return (await store.read(run_id, STATE, [key]))[0]


async def resolve_ref(store: Store, run_id: str, ref: str) -> Any:
    """A node's ``inputs`` reference: ``_raw`` key, ``node.path`` (a node output, else a context
    key), or a node id (its output, else the context key of that name)."""
    if ref.startswith("_"):
        v = await read_context(store, run_id, ref)
        return None if v is MISSING else v
    base, _, path = ref.partition(".")
    out, ctx = await store.read(run_id, STATE, [f"_outputs.{base}", base])
    value = out if out is not MISSING else ctx
    if value is MISSING:
        return None
    for part in path.split(".") if path else ():
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


async def read_node_input(store: Store, bp: Blueprint, node: NodeDef, run_id: str) -> Any:
    if isinstance(node.inputs, str):
        return await resolve_ref(store, run_id, node.inputs)
    if isinstance(node.inputs, Mapping):
        return {k: await resolve_ref(store, run_id, v) for k, v in node.inputs.items()}
    v = await read_context(store, run_id, f"_inputs.{node.id}")
    return None if v is MISSING else v


async def read_scope(store: Store, run_id: str, names: set[str], base: dict[str, Any],
                     writes: Mapping[str, Any]) -> dict[str, Any]:
    """The names an expression may read: ``result``, ``input``, ``context``, ``outputs`` and every
    context key at top level. Only what the expressions name is read from the store."""
    wanted = names - base.keys()
    if not wanted:
        return base
    if "context" in wanted or "outputs" in wanted:
        ctx = await store.read_all(run_id, STATE)
    else:
        ctx = {k: v for k, v in zip(wanted, await store.read(run_id, STATE, list(wanted)), strict=True)
               if v is not MISSING}
    for k, v in writes.items():
        if v is _MISSING:
            ctx.pop(k, None)
        else:
            ctx[k] = v
    scope = dict(ctx)
    if "context" in wanted:
        scope["context"] = ctx
    if "outputs" in wanted:
        scope["outputs"] = {k[len("_outputs."):]: v for k, v in ctx.items() if k.startswith("_outputs.")}
    scope.update(base)
    return scope


async def read_route(
    store: Store,
    bp: Blueprint,
    node: NodeDef,
    run_id: str,
    output: Any,
    action: str | None,
    writes: Mapping[str, Any],
    node_input: Any,
    edges: Iterable[EdgeDef] | None = None,
) -> Route:
    """The route of a node's result (``routing.route_edges``), over a scope read from the run's context
    with the node's own context ``writes`` applied."""
    edges = list(bp.out_edges[node.id] if edges is None else edges)
    if not edges:
        return Route([])
    base = {"result": {"output": output, "action": action}, "input": node_input}
    scope = await read_scope(store, run_id, expression_names(edges), base, writes)
    return route_edges(edges, action, scope, output, node.id, run_id)
