"""What a step reads outside any transaction: a context key, a node's input, the scope an expression
sees, and from those the route a node's result takes. Read once, decided, then committed (step.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..blueprint import Blueprint, EdgeDef, NodeDef
from ..node_api import _MISSING
from ..store import JOINS, MISSING, NODES, RUN, STATE, Store, Txn
from .routing import Route, expression_names, route_edges
from .state import META_FIELDS, arrival_field, count_field


async def read_context(store: Store, run_id: str, key: str) -> Any:
    return (await store.read(run_id, STATE, [key]))[0]


def _ref_fields(ref: str) -> list[str]:
    if ref.startswith("_"):
        return [ref]
    base = ref.partition(".")[0]
    return [f"_outputs.{base}", base]


def input_fields(node: NodeDef) -> list[str]:
    """The context keys a node's input is made of, known from the blueprint alone: so the step's claim reads
    them in its own transaction, with everything else it reads, in one go."""
    if node.inputs is None:  # (the common case first: isinstance of an ABC costs a node's step dearly)
        return [f"_inputs.{node.id}"]
    if isinstance(node.inputs, str):
        return _ref_fields(node.inputs)
    if isinstance(node.inputs, Mapping):
        return [f for ref in node.inputs.values() for f in _ref_fields(ref)]
    return [f"_inputs.{node.id}"]


def _resolve_ref(values: Mapping[str, Any], ref: str) -> Any:
    """A node's ``inputs`` reference: ``_raw`` key, ``node.path`` (a node output, else a context
    key), or a node id (its output, else the context key of that name)."""
    if ref.startswith("_"):
        return values.get(ref)
    base, _, path = ref.partition(".")
    value = values.get(f"_outputs.{base}", MISSING)
    if value is MISSING:
        value = values.get(base, MISSING)
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


def node_input_from(node: NodeDef, values: Mapping[str, Any]) -> Any:
    """A node's input, from the values of its ``input_fields`` (absent keys missing from ``values``)."""
    if node.inputs is None:
        return values.get(f"_inputs.{node.id}")
    if isinstance(node.inputs, str):
        return _resolve_ref(values, node.inputs)
    if isinstance(node.inputs, Mapping):
        return {k: _resolve_ref(values, v) for k, v in node.inputs.items()}
    return values.get(f"_inputs.{node.id}")


async def read_node_input(store: Store, bp: Blueprint, node: NodeDef, run_id: str) -> Any:
    fields = input_fields(node)
    got = await store.read(run_id, STATE, fields)
    return node_input_from(node, {f: v for f, v in zip(fields, got, strict=True) if v is not MISSING})


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


def _gen_known(bp: Blueprint, node_id: str) -> bool:
    """Outside every loop a node stays in generation 0, so its join fields are known before its record is."""
    return not bp.loops_containing.get(node_id) and not bp.is_loop_controller(node_id)


def tracks_arrivals(bp: Blueprint, node_id: str) -> bool:
    """Does a node's join record its arrivals (``JOINS``)? Not for one predecessor outside every loop: its
    one arrival decides it at once (fire or skip), and its record then says so (``joins.decided_in``), so
    a second delivery of that arrival changes nothing. A chain's steps then write no join fields at all."""
    return len(bp.predecessors.get(node_id, ())) > 1 or not _gen_known(bp, node_id)


async def prefetch_commit(t: Txn, bp: Blueprint, node_id: str) -> None:
    """What committing ``node_id``'s result reads, fetched up front in (at most) two round trips instead of
    one per field: its successors' records, then their join arrivals and counts in those records'
    generations. A store that remembers the run (RedisStore) usually has them all already (``warm_next``)."""
    if not t.reads_ahead:
        return
    targets = list(dict.fromkeys(e.target for e in bp.out_edges[node_id]))
    if not targets:
        return
    await t.prefetch({NODES: targets})
    recs = await t.get_many(NODES, targets)
    fields = []
    for tgt in targets:
        if tracks_arrivals(bp, tgt):
            gen = recs[tgt].get("gen", 0) if isinstance(recs.get(tgt), Mapping) else 0
            fields += [arrival_field(tgt, gen, node_id), count_field(tgt, gen)]
    if fields:
        await t.prefetch({JOINS: fields})


_RUN_FIELDS: dict[int, tuple[Blueprint, dict[str, list[str]]]] = {}  # id(bp) -> (bp, its run_fields)


def first_reads(node: NodeDef) -> dict[str, list[str]]:
    """What a queued step of ``node`` reads before it decides anything: the run's meta, the node's record, its
    input (``Step.claim``)."""
    return {RUN: list(META_FIELDS), NODES: [node.id], STATE: input_fields(node)}


def run_fields(bp: Blueprint) -> dict[str, list[str]]:
    """Every node record, and every join field whose name is known before its record is (``_gen_known``):
    what a run's steps read, beyond their own inputs. Worked out once per blueprint (every step asks)."""
    got = _RUN_FIELDS.get(id(bp))
    if got is not None and got[0] is bp:
        return got[1]
    joins = []
    for edge in bp.edges:
        if _gen_known(bp, edge.target) and tracks_arrivals(bp, edge.target):
            joins += [arrival_field(edge.target, 0, edge.source), count_field(edge.target, 0)]
    fields = {NODES: [n.id for n in bp.nodes], JOINS: list(dict.fromkeys(joins))}
    if len(_RUN_FIELDS) > 1000:
        _RUN_FIELDS.clear()  # blueprints are few; definitions read from Redis come and go
    _RUN_FIELDS[id(bp)] = (bp, fields)
    return fields


def warm_run(t: Txn, bp: Blueprint) -> None:
    """Ask the store to send back ``run_fields`` with this commit, once per run (``Txn.warm_once``): a store
    that remembers the run (RedisStore) then reads nothing more for any step of it, unless another process
    changed what it remembers."""
    if "blueprint" not in t.warm_once:
        t.warm_once["blueprint"] = run_fields(bp)
