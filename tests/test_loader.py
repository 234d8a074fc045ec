"""Blueprint parsing, validation and file loading (loading/) and Mermaid rendering (graph.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flowcraft_cli.blueprint import JoinStrategy, NodeConfig
from flowcraft_cli.errors import BlueprintError
from flowcraft_cli.graph import render_mermaid
from flowcraft_cli.loading import (
    load_blueprint_file,
    load_blueprints,
    loop_condition,
    parse_blueprint,
    parse_duration_ms,
)
from flowcraft_cli.registry import NodeRegistry

EXAMPLES = Path("/work/shared/reference/flowcraft-examples")
SRC = "bp.yaml"


def _fn(ctx: Any) -> Any:
    return None


REGISTRY = NodeRegistry({name: _fn for name in ("validate-order", "charge", "http_fetch", "notify")})


def problems_of(doc: Any, **kwargs: Any) -> list[str]:
    kwargs.setdefault("source", SRC)
    with pytest.raises(BlueprintError) as info:
        parse_blueprint(doc, **kwargs)
    return info.value.problems


def one_problem(doc: Any, **kwargs: Any) -> str:
    found = problems_of(doc, **kwargs)
    assert len(found) == 1, found
    return found[0]


def chain(*ids: str, uses: str = "notify") -> dict[str, Any]:
    return {
        "id": "t",
        "nodes": [{"id": i, "uses": uses} for i in ids],
        "edges": [{"source": a, "target": b} for a, b in zip(ids, ids[1:], strict=False)],
    }


# --------------------------------------------------------------------------------------------- model


def test_full_blueprint_builds_the_model() -> None:
    doc = {
        "id": "order-processing",
        "metadata": {"version": "3"},
        "nodes": [
            {
                "id": "validate",
                "uses": "validate-order",
                "params": {"strict": True},
                "inputs": "order",
                "config": {
                    "maxRetries": 3,
                    "retryDelay": 500,
                    "timeout": 10000,
                    "fallback": "manual",
                    "joinStrategy": "any",
                },
            },
            {"id": "charge", "uses": "charge", "inputs": {"order": "validate", "total": "validate.total"}},
            {
                "id": "manual",
                "uses": "notify",
                "config": {"max_retries": 2, "retry_delay": 5, "join_strategy": "all"},
            },
        ],
        "edges": [
            {
                "source": "validate",
                "target": "charge",
                "action": "ok",
                "condition": "result.output.total > 100",
                "transform": "input.items",
            }
        ],
    }
    bp = parse_blueprint(doc, source=SRC, registry=REGISTRY)
    assert bp.id == "order-processing"
    assert bp.version == "3"
    assert bp.source == SRC
    assert bp.raw is doc
    v = bp.node_map["validate"]
    assert v.params == {"strict": True}
    assert v.inputs == "order"
    assert v.config == NodeConfig(
        max_retries=3, retry_delay_ms=500, timeout_ms=10000, fallback="manual", join_strategy=JoinStrategy.ANY
    )
    assert bp.node_map["charge"].inputs == {"order": "validate", "total": "validate.total"}
    assert bp.node_map["charge"].config == NodeConfig()
    assert bp.node_map["manual"].config == NodeConfig(max_retries=2, retry_delay_ms=5)
    (edge,) = bp.edges
    assert (edge.source, edge.target, edge.action, edge.index) == ("validate", "charge", "ok", 0)
    assert edge.condition is not None and edge.condition.source == "result.output.total > 100"
    assert edge.transform is not None and edge.transform.source == "input.items"
    assert bp.start_nodes == ("validate",)


def test_nodes_and_edges_may_be_objects() -> None:
    doc = {
        "nodes": {"x": {"id": "a", "uses": "notify"}, "y": {"id": "b", "uses": "notify"}},
        "edges": {"e1": {"source": "a", "target": "b"}},
    }
    bp = parse_blueprint(doc, default_id="from-file")
    assert bp.id == "from-file"
    assert [n.id for n in bp.nodes] == ["a", "b"]
    assert [(e.source, e.target) for e in bp.edges] == [("a", "b")]


def test_registry_none_skips_uses_check() -> None:
    bp = parse_blueprint(chain("a", "b", uses="anything-goes"))
    assert len(bp.nodes) == 2


def test_flowcraft_source_location_is_ignored() -> None:
    doc = chain("a")
    doc["nodes"][0]["_sourceLocation"] = {"file": "x.ts", "line": 3}
    assert parse_blueprint(doc).nodes[0].id == "a"


# --------------------------------------------------------------------------------------------- problems


def test_unknown_keys_at_every_level_with_suggestions() -> None:
    doc = {
        "id": "t",
        "nods": [],
        "nodes": [{"id": "a", "use": "notify", "uses": "notify", "config": {"maxRetry": 2}}],
        "edges": [],
    }
    doc["nodes"].append({"id": "b", "uses": "notify"})
    doc["edges"].append({"source": "a", "target": "b", "conditon": "true"})
    found = problems_of(doc)
    assert f"{SRC}: nods: unknown key (did you mean 'nodes'?); allowed: id, nodes, edges, metadata" in found
    assert any(p.startswith(f"{SRC}: nodes[0].use: unknown key (did you mean 'uses'?)") for p in found)
    assert any(
        p.startswith(f"{SRC}: nodes[0].config.maxRetry: unknown key (did you mean 'maxRetries'?)")
        for p in found
    )
    assert any(
        p.startswith(f"{SRC}: edges[0].conditon: unknown key (did you mean 'condition'?)") for p in found
    )
    assert len(found) == 4


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({"uses": "notify"}, "nodes[0].id: missing"),
        ({"id": "", "uses": "notify"}, "nodes[0].id: must not be empty"),
        ({"id": 5, "uses": "notify"}, "nodes[0].id: must be a string, got 5"),
        ({"id": "a"}, "nodes[0].uses: missing"),
        ({"id": "a", "uses": ["x"]}, 'nodes[0].uses: must be a string, got ["x"]'),
    ],
)
def test_node_id_and_uses_required(node: dict[str, Any], expected: str) -> None:
    found = problems_of({"id": "t", "nodes": [node]})
    assert any(p.startswith(f"{SRC}: {expected}") for p in found), found


def test_edge_source_and_target_required() -> None:
    doc = chain("a", "b")
    doc["edges"] = [{"target": "b"}, {"source": "a", "target": ""}, {"source": "a", "target": 3}]
    found = problems_of(doc)
    assert any(p.startswith(f"{SRC}: edges[0].source: missing") for p in found)
    assert any(p.startswith(f"{SRC}: edges[1].target: must not be empty") for p in found)
    assert f"{SRC}: edges[2].target: must be a string, got 3" in found


def test_top_level_id_problems() -> None:
    assert one_problem({"nodes": [{"id": "a", "uses": "x"}]}).startswith(f"{SRC}: id: missing")
    assert one_problem({"id": 100, "nodes": [{"id": "a", "uses": "x"}]}) == (
        f'{SRC}: id: must be a string, got 100 (quote it: id: "100")'
    )


def test_not_a_mapping() -> None:
    assert one_problem([1, 2]).startswith(f"{SRC}: top level: a blueprint must be a mapping")
    assert one_problem(None).endswith("got empty")


def test_nodes_missing_or_empty() -> None:
    assert one_problem({"id": "t"}) == f"{SRC}: nodes: missing: a blueprint needs a list of nodes"
    assert (
        one_problem({"id": "t", "nodes": []})
        == f"{SRC}: nodes: is empty: a blueprint needs at least one node"
    )
    assert one_problem({"id": "t", "nodes": "a"}).startswith(f"{SRC}: nodes: must be a list")


def test_duplicate_node_ids() -> None:
    doc = chain("a", "b")
    doc["nodes"].append({"id": "a", "uses": "notify"})
    assert one_problem(doc) == f"{SRC}: nodes[2].id: duplicate node id 'a' (first defined at nodes[0])"


def test_edges_to_missing_nodes_with_suggestion() -> None:
    doc = chain("validate", "charge")
    doc["edges"].append({"source": "validate", "target": "chrage"})
    doc["edges"].append({"source": "nowhere", "target": "charge"})
    found = problems_of(doc)
    assert found == [
        f"{SRC}: edges[1].target: 'chrage' is not a node (did you mean 'charge'?)",
        f"{SRC}: edges[2].source: 'nowhere' is not a node",
    ]


def test_uses_not_registered_did_you_mean() -> None:
    doc = chain("a")
    doc["nodes"][0]["uses"] = "http_get"
    assert (
        one_problem(doc, registry=REGISTRY)
        == f"{SRC}: nodes[0].uses: 'http_get' is not registered (did you mean 'http_fetch'?)"
    )
    doc["nodes"][0]["uses"] = "loop-controler"
    assert "(did you mean 'loop-controller'?)" in one_problem(doc, registry=REGISTRY)
    doc["nodes"][0]["uses"] = "zzzz"
    assert one_problem(doc, registry=REGISTRY).startswith(
        f"{SRC}: nodes[0].uses: 'zzzz' is not registered (is the module"
    )
    doc["nodes"][0]["uses"] = "batch-scatter"
    assert "use 'batch' with params.worker instead" in one_problem(doc, registry=REGISTRY)


def test_builtins_need_no_registration() -> None:
    doc = {
        "id": "t",
        "nodes": [
            {"id": "w", "uses": "wait"},
            {"id": "s", "uses": "sleep", "params": {"duration": "5s"}},
            {"id": "b", "uses": "batch", "params": {"worker": "notify"}},
        ],
        "edges": [{"source": "w", "target": "s"}, {"source": "s", "target": "b"}],
    }
    assert len(parse_blueprint(doc, registry=REGISTRY).nodes) == 3


def test_invalid_expressions() -> None:
    doc = chain("a", "b")
    doc["edges"][0].update(condition="result.output >", transform=42)
    found = problems_of(doc)
    assert len(found) == 2
    assert found[0].startswith(f"{SRC}: edges[0].condition: ")
    assert "result.output >" in found[0]
    assert found[1] == f"{SRC}: edges[0].transform: must be a string expression, got 42"


def test_edge_action_must_be_a_string() -> None:
    doc = chain("a", "b")
    doc["edges"][0]["action"] = True
    assert (
        one_problem(doc)
        == f'{SRC}: edges[0].action: must be a non-empty string, got true (quote it: action: "true")'
    )


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"maxRetries": 0}, "nodes[0].config.maxRetries: must be an integer >= 1, got 0"),
        ({"max_retries": 2.5}, "nodes[0].config.max_retries: must be an integer >= 1, got 2.5"),
        ({"maxRetries": True}, "nodes[0].config.maxRetries: must be an integer >= 1, got true"),
        ({"retryDelay": -1}, "nodes[0].config.retryDelay: must be a number of milliseconds >= 0, got -1"),
        ({"retryDelay": "1s"}, "nodes[0].config.retryDelay: must be a number of milliseconds >= 0, got '1s'"),
        ({"timeout": 0}, "nodes[0].config.timeout: must be a number of milliseconds > 0, got 0"),
        ({"joinStrategy": "first"}, "nodes[0].config.joinStrategy: must be 'all' or 'any', got 'first'"),
        (
            {"maxRetries": 2, "max_retries": 3},
            "nodes[0].config.max_retries: given twice, as 'maxRetries' and 'max_retries'",
        ),
        ("fast", "nodes[0].config: must be a mapping, got a string"),
    ],
)
def test_config_values(config: Any, expected: str) -> None:
    doc = chain("a")
    doc["nodes"][0]["config"] = config
    assert one_problem(doc).startswith(f"{SRC}: {expected}")


def test_fallback_problems() -> None:
    doc = chain("a", "b")
    doc["nodes"][0]["config"] = {"fallback": "a"}
    doc["nodes"][1]["config"] = {"fallback": "manul"}
    doc["nodes"].append({"id": "manual", "uses": "notify"})
    found = problems_of(doc)
    assert (
        f"{SRC}: nodes[0].config.fallback: 'a' is the node itself; a fallback must be another node" in found
    )
    assert f"{SRC}: nodes[1].config.fallback: 'manul' is not a node (did you mean 'manual'?)" in found


def test_fallback_node_with_incoming_edges() -> None:
    doc = chain("a", "b")
    doc["nodes"][0]["config"] = {"fallback": "b"}
    found = one_problem(doc)
    assert found.startswith(
        f"{SRC}: nodes[0].config.fallback: fallback node 'b' has incoming edges (from 'a')"
    )
    assert "never a start node" in found


def test_fallback_node_is_reachable_through_the_node_it_stands_in_for() -> None:
    doc = chain("a", "b")
    doc["nodes"][1]["config"] = {"fallback": "manual"}
    doc["nodes"].append({"id": "manual", "uses": "notify"})
    bp = parse_blueprint(doc)
    assert bp.start_nodes == ("a",)
    assert bp.fallback_nodes == {"manual"}


def test_fallback_chain_loop() -> None:
    doc = chain("s", "a")
    doc["nodes"][1]["config"] = {"fallback": "b"}
    doc["nodes"].append({"id": "b", "uses": "notify", "config": {"fallback": "c"}})
    doc["nodes"].append({"id": "c", "uses": "notify", "config": {"fallback": "b"}})
    assert f"{SRC}: nodes[2].config.fallback: fallback chain loops: b -> c -> b" in problems_of(doc)


def test_params_and_inputs_types() -> None:
    doc = chain("a", "b", "c")
    doc["nodes"][0]["params"] = ["x"]
    doc["nodes"][1]["inputs"] = 5
    doc["nodes"][2]["inputs"] = {"x": "ok", "y": ["a"]}
    found = problems_of(doc)
    assert found == [
        f"{SRC}: nodes[0].params: must be a mapping, got a list",
        f"{SRC}: nodes[1].inputs: must be a string or a mapping of {{name: reference}}, got a number 5",
        f"{SRC}: nodes[2].inputs.y: must be a string (a context key, node id or 'node.path'), got [\"a\"]",
    ]


def test_metadata_must_be_a_mapping() -> None:
    doc = chain("a")
    doc["metadata"] = ["v1"]
    assert one_problem(doc) == f"{SRC}: metadata: must be a mapping, got a list"


def test_cycle_without_loop_controller() -> None:
    doc = chain("start", "a", "b", "c")
    doc["edges"].append({"source": "c", "target": "a"})
    found = one_problem(doc)
    assert found.startswith(
        f"{SRC}: edges[3]: cycle a -> b -> c -> a does not pass through a loop-controller"
    )


def test_self_loop() -> None:
    doc = chain("s", "a")
    doc["edges"].append({"source": "a", "target": "a"})
    assert one_problem(doc).startswith(f"{SRC}: edges[1]: cycle a -> a does not pass through")


def _loop_doc() -> dict[str, Any]:
    return {
        "id": "loop",
        "nodes": [
            {"id": "init", "uses": "notify"},
            {
                "id": "loop",
                "uses": "loop-controller",
                "params": {"condition": "counter < 3", "maxIterations": 10},
            },
            {"id": "body", "uses": "notify"},
            {"id": "body2", "uses": "notify"},
            {"id": "end", "uses": "notify"},
        ],
        "edges": [
            {"source": "init", "target": "loop"},
            {"source": "loop", "target": "body", "action": "continue"},
            {"source": "body", "target": "body2"},
            {"source": "body2", "target": "loop"},
            {"source": "loop", "target": "end", "action": "break"},
        ],
    }


def test_cycle_through_loop_controller_is_fine() -> None:
    bp = parse_blueprint(_loop_doc(), registry=REGISTRY)
    node = bp.node_map["loop"]
    cond = loop_condition(node)
    assert cond is not None and cond.source == "counter < 3"
    assert loop_condition(node) is cond  # cached by source text
    assert node.params == {"condition": "counter < 3", "maxIterations": 10}
    assert loop_condition(bp.node_map["body"]) is None


def test_loop_controller_problems() -> None:
    doc = _loop_doc()
    doc["nodes"][1]["params"] = {"condition": "counter <", "maxIterations": 0}
    doc["edges"][1]["action"] = "again"
    found = problems_of(doc)
    assert found[0].startswith(f"{SRC}: nodes[1].params.condition: ")
    assert found[1] == f"{SRC}: nodes[1].params.maxIterations: must be an integer >= 1, got 0"
    assert found[2].startswith(
        f"{SRC}: nodes[1]: loop-controller 'loop' has no outgoing edge with action 'continue'"
    )
    assert found[3] == (
        f"{SRC}: edges[1].action: 'again' is never taken: a loop-controller returns only 'continue' or 'break'"
    )
    assert len(found) == 4


def test_unreachable_node() -> None:
    doc = chain("a", "b")
    doc["nodes"] += [{"id": "c", "uses": "notify"}, {"id": "island", "uses": "notify"}]
    doc["edges"] += [{"source": "island", "target": "island"}, {"source": "c", "target": "island"}]
    # c is a start node; island is reachable from c, but is a self-loop
    found = problems_of(doc)
    assert found == [
        f"{SRC}: edges[1]: cycle island -> island does not pass through a loop-controller "
        "(route the loop-back edge into a 'loop-controller' node, which continues or breaks the loop)"
    ]
    doc["edges"].pop()
    found = problems_of(doc)
    assert (
        f"{SRC}: nodes[3]: node 'island' is unreachable: no path leads to it from a start node (start nodes: 'a', 'c')"
        in found
    )


def test_no_start_node() -> None:
    doc = {
        "id": "t",
        "nodes": [
            {"id": "a", "uses": "loop-controller", "params": {"condition": "true"}},
            {"id": "b", "uses": "x"},
        ],
        "edges": [{"source": "a", "target": "b", "action": "continue"}, {"source": "b", "target": "a"}],
    }
    assert one_problem(doc).startswith(f"{SRC}: nodes: no start node: every node has an incoming edge")


def test_batch_worker() -> None:
    doc = chain("a", "b", "c", "d", uses="batch")
    doc["nodes"][0]["params"] = {"worker": "notfy"}
    doc["nodes"][1]["params"] = {}
    doc["nodes"][2]["params"] = {"worker": 3}
    doc["nodes"][3]["params"] = {"worker": "notify"}
    found = problems_of(doc, registry=REGISTRY)
    assert found == [
        f"{SRC}: nodes[0].params.worker: 'notfy' is not registered (did you mean 'notify'?)",
        f"{SRC}: nodes[1].params.worker: missing: a batch node needs the name of the node to run per item",
        f"{SRC}: nodes[2].params.worker: must be a node name, got 3",
    ]
    # without a registry only the shape is checked
    assert len(problems_of(doc)) == 2


def test_subflow_blueprint_id() -> None:
    doc = chain("a", "b", uses="subflow")
    doc["nodes"][0]["params"] = {"blueprintId": "chlid"}
    doc["nodes"][1]["params"] = {"inputs": ["x"]}
    found = problems_of(doc, known_blueprint_ids={"child", "other"})
    assert found == [
        f"{SRC}: nodes[0].params.blueprintId: unknown blueprint 'chlid' (did you mean 'child'?)",
        f"{SRC}: nodes[1].params.blueprintId: missing: a subflow node needs the id of the blueprint to run",
        f"{SRC}: nodes[1].params.inputs: must be a mapping of {{key: key}}, got a list",
    ]
    # unknown ids are only checked when the set of known ids is given
    assert len(problems_of(doc)) == 2


@pytest.mark.parametrize("duration", [None, -5, "5 min", "1.5s", "10", True, "5w"])
def test_sleep_invalid_duration(duration: Any) -> None:
    doc = chain("a", uses="sleep")
    doc["nodes"][0]["params"] = {} if duration is None else {"duration": duration}
    assert one_problem(doc).startswith(f"{SRC}: nodes[0].params.duration: ")


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (0, 0),
        (250, 250),
        (1.2, 2),
        ("500ms", 500),
        ("30s", 30_000),
        ("5m", 300_000),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
    ],
)
def test_parse_duration_ms(value: Any, ms: int) -> None:
    assert parse_duration_ms(value) == ms


def test_parse_duration_ms_error_message() -> None:
    with pytest.raises(ValueError, match=r"invalid duration '5 min': expected milliseconds"):
        parse_duration_ms("5 min")


def test_many_problems_reported_at_once() -> None:
    doc = {
        "id": "t",
        "extra": 1,
        "nodes": [
            {"id": "a", "uses": "nope", "config": {"maxRetries": 0}},
            {"id": "a", "uses": "notify"},
            {"id": "b", "uses": "notify", "config": {"joinStrategy": "some"}},
        ],
        "edges": [{"source": "a", "target": "c"}, {"source": "a", "target": "b", "condition": "1 +"}],
    }
    found = problems_of(doc, registry=REGISTRY)
    assert [p.split(": ")[1] for p in found] == [
        "extra",
        "nodes[0].config.maxRetries",
        "nodes[0].uses",
        "nodes[1].id",
        "nodes[2].config.joinStrategy",
        "edges[0].target",
        "edges[1].condition",
    ]
    assert all(p.startswith(f"{SRC}: ") for p in found)


def test_ten_thousand_node_chain_validates() -> None:
    ids = [f"n{i}" for i in range(10_000)]
    bp = parse_blueprint(chain(*ids))
    assert len(bp.nodes) == 10_000
    assert bp.start_nodes == ("n0",)


def test_ten_thousand_node_cycle_is_found_without_recursion() -> None:
    ids = [f"n{i}" for i in range(10_000)]
    doc = chain("s", *ids)
    doc["edges"].append({"source": ids[-1], "target": ids[0]})
    assert "does not pass through a loop-controller" in one_problem(doc)


# --------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("folder", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_flowcraft_examples_load_unchanged(folder: str) -> None:
    blueprints = load_blueprints([EXAMPLES / folder])
    files = sorted((EXAMPLES / folder).glob("*.json"))
    assert sorted(blueprints) == sorted(f.stem for f in files)
    for f in files:
        bp = blueprints[f.stem]
        assert bp.raw == json.loads(f.read_text())
        assert bp.source == str(EXAMPLES / folder / f.name)


def test_flowcraft_example_subflow_ids_are_checked_across_files() -> None:
    # 200 calls subflows 201 and 202: alone it names unknown blueprints, with its siblings it loads
    with pytest.raises(BlueprintError) as info:
        load_blueprints([EXAMPLES / "2.job-application" / "200.json"])
    assert [p.split(": ", 2)[1] for p in info.value.problems] == [
        "nodes[3].params.blueprintId",
        "nodes[4].params.blueprintId",
    ]
    assert load_blueprint_file(EXAMPLES / "2.job-application" / "200.json").id == "200"


def test_load_yaml_folder_and_id_from_stem(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text("nodes:\n  - {id: a, uses: notify}\n")
    (tmp_path / "two.yml").write_text(
        "id: second\nnodes:\n  - id: s\n    uses: subflow\n    params: {blueprintId: one}\n"
    )
    (tmp_path / "README.md").write_text("not a blueprint")
    blueprints = load_blueprints([tmp_path], registry=REGISTRY)
    assert sorted(blueprints) == ["one", "second"]
    assert blueprints["one"].source == str(tmp_path / "one.yaml")


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    f = tmp_path / "dup.yaml"
    f.write_text("id: dup\nnodes:\n  - id: a\n    uses: notify\n    id: b\n")
    with pytest.raises(BlueprintError) as info:
        load_blueprint_file(f)
    assert info.value.problems == [f"{f}: line 5: duplicate key 'id'"]


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    f = tmp_path / "merge.yaml"
    f.write_text(
        "nodes:\n  - &base {id: a, uses: notify}\n  - <<: *base\n    id: b\n"
        "edges:\n  - {source: a, target: b}\n"
    )
    assert [n.id for n in load_blueprint_file(f).nodes] == ["a", "b"]


def test_malformed_yaml_line_number(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("id: bad\nnodes:\n  - id: a\n    uses: [notify\n")
    with pytest.raises(BlueprintError) as info:
        load_blueprints([f])
    (problem,) = info.value.problems
    assert problem.startswith(f"{f}: line 5: ")


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    f = tmp_path / "evil.yaml"
    f.write_text("id: !!python/object/apply:os.system ['true']\nnodes: []\n")
    with pytest.raises(BlueprintError) as info:
        load_blueprint_file(f)
    assert info.value.problems[0].startswith(f"{f}: line 1: ")


def test_malformed_json(tmp_path: Path) -> None:
    f = tmp_path / "bad.json"
    f.write_text('{\n  "nodes": [\n    {"id": "a", "uses": "x",}\n  ]\n}\n')
    with pytest.raises(BlueprintError) as info:
        load_blueprints([f])
    assert info.value.problems == [
        f"{f}: line 3 column 29: Expecting property name enclosed in double quotes"
    ]


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "flow.yaml").write_text("nodes: [{id: x, uses: notify}]\n")
    (tmp_path / "b.json").write_text('{"id": "flow", "nodes": [{"id": "x", "uses": "notify"}]}')
    with pytest.raises(BlueprintError) as info:
        load_blueprints([tmp_path / "a", tmp_path / "b.json"])
    assert info.value.problems == [
        f"{tmp_path / 'b.json'}: id: duplicate blueprint id 'flow' (also defined in {tmp_path / 'a' / 'flow.yaml'})"
    ]


def test_problems_collected_across_files_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text("nodes: [{id: a, uses: notfy}]\n")
    (tmp_path / "two.yaml").write_text("nodes: [{id: a, uses: notify}]\nedges: [{source: a, target: b}]\n")
    (tmp_path / "three.txt").write_text("")
    missing = tmp_path / "missing"
    with pytest.raises(BlueprintError) as info:
        load_blueprints([tmp_path, missing, tmp_path / "three.txt"], registry=REGISTRY)
    assert info.value.problems == [
        f"{missing}: no such file or directory",
        f"{tmp_path / 'three.txt'}: not a blueprint file (expected .yaml, .yml or .json)",
        f"{tmp_path / 'one.yaml'}: nodes[0].uses: 'notfy' is not registered (did you mean 'notify'?)",
        f"{tmp_path / 'two.yaml'}: edges[0].target: 'b' is not a node",
    ]


def test_same_file_twice_is_not_a_duplicate(tmp_path: Path) -> None:
    f = tmp_path / "one.yaml"
    f.write_text("nodes: [{id: a, uses: notify}]\n")
    assert list(load_blueprints([tmp_path, f])) == ["one"]


# --------------------------------------------------------------------------------------------- mermaid


def test_render_mermaid() -> None:
    doc = {
        "id": "m",
        "nodes": [
            {"id": "check", "uses": "notify", "config": {"fallback": "manual"}},
            {"id": "process-big", "uses": "charge"},
            {"id": 'say "hi" [x]', "uses": "notify"},
            {"id": "manual", "uses": "notify"},
        ],
        "edges": [
            {"source": "check", "target": "process-big", "action": "big", "condition": "result.output > 0"},
            {"source": "check", "target": 'say "hi" [x]'},
        ],
    }
    text = render_mermaid(parse_blueprint(doc))
    assert text.splitlines() == [
        "flowchart TD",
        '  n0["check<br/>notify"]',
        '  n1["process-big<br/>charge"]',
        '  n2["say #quot;hi#quot; [x]<br/>notify"]',
        '  n3["manual<br/>notify"]',
        '  n0 -- "big | result.output #gt; 0" --> n1',
        "  n0 --> n2",
        "  n0 -. fallback .-> n3",
    ]
