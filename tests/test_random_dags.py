"""Property check: on random DAGs with actions, conditions and both join strategies, both runtimes agree with a
small reference model of CONTRACT §5.4-5.5 (routing, dead-path skipping, joins) on every node's status."""

from __future__ import annotations

import random

import pytest

from flowcraft_cli import NodeResult

ACTIONS = ("go", "stop", "maybe")


def make_dag(seed: int) -> tuple[dict, dict[str, str | None], dict[str, str]]:
    rng = random.Random(seed)
    n = rng.randint(4, 14)
    ids = [f"n{i}" for i in range(n)]
    node_action = {nid: rng.choice((None, *ACTIONS)) for nid in ids}
    nodes = [{"id": nid, "uses": "step", "params": {"action": node_action[nid], "value": i},
              "config": {"joinStrategy": rng.choice(("all", "any"))}} for i, nid in enumerate(ids)]
    edges = []
    for j in range(1, n):
        for i in rng.sample(range(j), k=min(j, rng.randint(0, 3))):
            edge = {"source": ids[i], "target": ids[j]}
            if rng.random() < 0.4:
                edge["action"] = rng.choice(ACTIONS)
            if rng.random() < 0.3:
                edge["condition"] = f"result.output > {rng.randint(0, n)}"
            edges.append(edge)
    bp = {"id": f"dag-{seed}", "nodes": nodes, "edges": edges}
    return bp, node_action, expected_statuses(bp, node_action)


def expected_statuses(bp: dict, node_action: dict[str, str | None]) -> dict[str, str]:
    """The reference model: a node runs if it has no incoming edge, or if at least one incoming edge was taken
    (all: once every predecessor decided; any: on the first; in a DAG both end the same); else it is skipped."""
    status: dict[str, str] = {}
    value = {nd["id"]: nd["params"]["value"] for nd in bp["nodes"]}
    for nd in bp["nodes"]:  # ids are in topological order
        nid = nd["id"]
        incoming = [e for e in bp["edges"] if e["target"] == nid]
        if not incoming:
            status[nid] = "completed"
            continue
        taken = False
        for src in dict.fromkeys(e["source"] for e in incoming):
            if status[src] != "completed":
                continue
            out = [e for e in bp["edges"] if e["source"] == src]

            def holds(e: dict, src: str = src) -> bool:
                cond = e.get("condition")
                return cond is None or value[src] > int(cond.rsplit(" ", 1)[1])

            action = node_action[src]
            chosen = [e for e in out if action is not None and e.get("action") == action and holds(e)]
            if not chosen:
                chosen = [e for e in out if "action" not in e and holds(e)]
            taken |= any(e["target"] == nid for e in chosen)
        status[nid] = "completed" if taken else "skipped"
    return status


def step(ctx):
    return NodeResult(output=ctx.params["value"], action=ctx.params["action"])


@pytest.mark.parametrize("seed", range(12))
def test_random_dag_matches_the_reference_model(flow, seed):
    bp, _, expected = make_dag(seed)
    r = flow.run(bp, {"step": step})
    assert r.status == "completed", r.reason
    got = {n.node_id: n.status for n in r.view.nodes}
    assert got == expected, bp
    assert set(r.outputs) == {n for n, st in expected.items() if st == "completed"}
