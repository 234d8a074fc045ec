"""Graph checks over a parsed document: fallbacks, loop-controller edges, cycles, start nodes, reachability.

Iterative and linear in nodes + edges: a 10,000-node chain validates without recursion or quadratic scans.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ..blueprint import BREAK, BUILTINS, CONTINUE, EdgeDef
from .problems import Problems, did_you_mean, list_names

if TYPE_CHECKING:
    from .parse import NodeDraft

#: per node id: its outgoing edges, each with its path in the document
OutEdges = dict[str, list[tuple[EdgeDef, str]]]


def check_graph(drafts: dict[str, NodeDraft], edges: list[tuple[EdgeDef, str]], problems: Problems) -> None:
    """Every graph problem of the nodes and edges that parsed. A fallback naming no other node is reported
    and dropped from its draft, so the later checks see only fallbacks that exist."""
    out: OutEdges = {nid: [] for nid in drafts}
    incoming: dict[str, list[EdgeDef]] = {nid: [] for nid in drafts}
    for edge, path in edges:
        out[edge.source].append((edge, path))
        incoming[edge.target].append(edge)

    fallback_of = _check_fallbacks(drafts, incoming, problems)
    _check_fallback_chains(drafts, problems)

    for d in drafts.values():
        if d.uses == "loop-controller":
            _check_loop_edges(d, out[d.id], problems)

    _check_cycles(drafts, out, problems)

    if not drafts:
        return
    starts = [nid for nid in drafts if not incoming[nid] and nid not in fallback_of]
    if not starts:
        extra = "" if not fallback_of else " or is a fallback node"
        problems.add(
            "nodes",
            f"no start node: every node has an incoming edge{extra} "
            "(a loop needs an entry edge from outside into its loop-controller)",
        )
        return
    _check_reachable(drafts, out, starts, problems)


def _check_fallbacks(
    drafts: dict[str, NodeDraft], incoming: dict[str, list[EdgeDef]], problems: Problems
) -> dict[str, list[str]]:
    """Returns fallback node -> the nodes it stands in for."""
    fallback_of: dict[str, list[str]] = {}
    for d in drafts.values():
        fb = d.config.get("fallback")
        if fb is None:
            continue
        where = d.fallback_path or d.path
        if fb == d.id:
            problems.add(where, f"{fb!r} is the node itself; a fallback must be another node")
            del d.config["fallback"]
        elif fb not in drafts:
            problems.add(where, f"{fb!r} is not a node{did_you_mean(fb, drafts)}")
            del d.config["fallback"]
        else:
            fallback_of.setdefault(fb, []).append(d.id)
            target = drafts[fb]
            if target.uses in BUILTINS:
                problems.add(
                    where,
                    f"fallback node {fb!r} uses the built-in {target.uses!r}; a fallback must be a registered "
                    "node function",
                )
            elif target.config.get("fallback") is not None:
                problems.add(
                    where,
                    f"fallback node {fb!r} has a fallback of its own ({target.config['fallback']!r}); "
                    f"fallbacks do not chain: give {d.id!r} the last resort directly",
                )
            if incoming[fb]:
                sources = list_names(dict.fromkeys(e.source for e in incoming[fb]))
                problems.add(
                    where,
                    f"fallback node {fb!r} has incoming edges (from {sources}); a fallback node stands in "
                    "for another node and is never a start node or an edge target: remove those edges",
                )
    return fallback_of


def _check_fallback_chains(drafts: dict[str, NodeDraft], problems: Problems) -> None:
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
            problems.add(d.fallback_path or d.path, f"fallback chain loops: {' -> '.join(loop)}")
        for nid in chain:
            state[nid] = 2


def _check_loop_edges(d: NodeDraft, out: list[tuple[EdgeDef, str]], problems: Problems) -> None:
    if not any(e.action == CONTINUE for e, _ in out):
        problems.add(
            d.path,
            f"loop-controller {d.id!r} has no outgoing edge with action 'continue' "
            "(add an edge to the first node of the loop body with action: continue)",
        )
    for e, path in out:
        if e.action is not None and e.action not in (CONTINUE, BREAK):
            problems.add(
                f"{path}.action",
                f"{e.action!r} is never taken: a loop-controller returns only 'continue' or 'break'",
            )


def _check_cycles(drafts: dict[str, NodeDraft], out: OutEdges, problems: Problems) -> None:
    """Cycles left after removing every loop-controller are errors; one reported per strongly connected
    component, as its shortest cycle through the component's first node."""
    succ: dict[str, list[tuple[str, int]]] = {}
    for nid, d in drafts.items():
        if d.uses == "loop-controller":
            continue
        succ[nid] = [
            (e.target, i) for i, (e, _) in enumerate(out[nid]) if drafts[e.target].uses != "loop-controller"
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
        problems.add(
            closing,
            f"cycle {' -> '.join(cycle)} does not pass through a loop-controller "
            "(route the loop-back edge into a 'loop-controller' node, which continues or breaks the loop)",
        )


def _check_reachable(
    drafts: dict[str, NodeDraft], out: OutEdges, starts: list[str], problems: Problems
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
            problems.add(
                d.path,
                f"node {nid!r} is unreachable: no path leads to it from a start node "
                f"(start nodes: {list_names(starts)})",
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
    start: str, members: set[str], succ: dict[str, list[tuple[str, int]]], out: OutEdges
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
