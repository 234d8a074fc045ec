"""Which out-edges of a finished node are taken (CONTRACT §5.4), as pure functions over the edges and an
expression scope: one copy for function nodes, resumed ``wait`` nodes and loop-controllers."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..blueprint import Blueprint, EdgeDef
from ..errors import ExpressionEvalError, InvalidInput
from .state import REF

log = logging.getLogger("flowcraft.engine")


@dataclass(slots=True)
class Decision:
    """What a finished node does to each successor: taken (with the value it delivers) or not."""

    target: str
    taken: bool
    value: Any = REF


@dataclass(slots=True)
class Route:
    """A finished node's decisions, and the expression errors met while making them (recorded as events)."""

    decisions: list[Decision]
    errors: list[str] = field(default_factory=list)


def expression_names(edges: Iterable[EdgeDef]) -> set[str]:
    """The names the edges' conditions and transforms read (what the scope must hold)."""
    names: set[str] = set()
    for e in edges:
        for expr in (e.condition, e.transform):
            if expr is not None:
                names |= set(expr.names)
    return names


def condition_holds(e: EdgeDef, scope: dict[str, Any], errors: list[str]) -> bool:
    """An edge's condition; one that fails to evaluate counts as false and is noted in ``errors``."""
    if e.condition is None:
        return True
    try:
        return bool(e.condition.evaluate(scope))
    except ExpressionEvalError as err:
        errors.append(f"edge {e.source}->{e.target} condition {e.condition.source!r}: {err}")
        return False


def select_edges(edges: list[EdgeDef], action: str | None, scope: dict[str, Any], errors: list[str]) -> list[EdgeDef]:
    """CONTRACT §5.4: the action's edges whose condition holds; if none, the default edges whose condition
    holds."""
    chosen = [e for e in edges if action is not None and e.action == action and condition_holds(e, scope, errors)]
    if not chosen:
        chosen = [e for e in edges if e.action is None and condition_holds(e, scope, errors)]
    return chosen


def aggregate(
    edges: list[EdgeDef], chosen: list[EdgeDef], scope: dict[str, Any], output: Any, events: list[str],
    node_id: str, run_id: str,
) -> Route:
    """One decision per distinct target: taken if any edge to it was taken (first taken edge's value). A
    transform that fails counts as not taken."""
    by_target: dict[str, Decision] = {}
    chosen_ids = {id(e) for e in chosen}
    for e in edges:
        d = by_target.setdefault(e.target, Decision(e.target, False))
        if d.taken or id(e) not in chosen_ids:
            continue
        value: Any = REF
        if e.transform is not None:
            try:
                value = e.transform.evaluate({**scope, "input": output})
            except ExpressionEvalError as err:
                events.append(f"edge {e.source}->{e.target} transform {e.transform.source!r}: {err}")
                continue
        d.taken, d.value = True, value
    for msg in events:
        log.info("run %s node %s: %s (counts as not taken)", run_id, node_id, msg)
    return Route(list(by_target.values()), events)


def route_edges(edges: list[EdgeDef], action: str | None, scope: dict[str, Any], output: Any, node_id: str,
                run_id: str) -> Route:
    """A node's route: every other edge than those ``select_edges`` picks is not taken."""
    if not edges:
        return Route([])
    errors: list[str] = []
    chosen = select_edges(edges, action, scope, errors)
    return aggregate(edges, chosen, scope, output, errors, node_id, run_id)


def check_resume_action(bp: Blueprint, node_id: str, action: str | None) -> None:
    """A resume's action must match an edge of the node when every edge of it has an action."""
    edges = bp.out_edges[node_id]
    actions = sorted({e.action for e in edges if e.action})
    if action is not None and actions and action not in actions and all(e.action for e in edges):
        import difflib  # only on this error path: keeps importing the engine cheap

        close = difflib.get_close_matches(action, actions, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidInput(f"action {action!r} matches no edge of node {node_id!r} ({hint}its actions: "
                           f"{', '.join(actions)})")
