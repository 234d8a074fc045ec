"""Typed specs of the built-in nodes (``NodeDef.spec``), parsed once at load from ``params``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowcraft_cli.blueprint import (
    DEFAULT_MAX_ITERATIONS,
    BatchSpec,
    Blueprint,
    LoopSpec,
    SleepSpec,
    SubflowSpec,
)
from flowcraft_cli.errors import BlueprintError
from flowcraft_cli.loading import load_blueprints, loop_condition, parse_blueprint, parse_duration_ms
from flowcraft_cli.registry import NodeRegistry

EXAMPLES = Path("/work/shared/reference/flowcraft-examples")
REGISTRY = NodeRegistry({"notify": lambda ctx: None})


def one_node(uses: str, params: Any = None, **kwargs: Any) -> Blueprint:
    node: dict[str, Any] = {"id": "n", "uses": uses}
    if params is not None:
        node["params"] = params
    return parse_blueprint({"id": "t", "nodes": [node], "edges": []}, **kwargs)


def loop_doc(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "t",
        "nodes": [
            {"id": "start", "uses": "notify"},
            {"id": "loop", "uses": "loop-controller", "params": params},
            {"id": "body", "uses": "notify"},
        ],
        "edges": [
            {"source": "start", "target": "loop"},
            {"source": "loop", "target": "body", "action": "continue"},
            {"source": "body", "target": "loop"},
        ],
    }


def test_loop_spec() -> None:
    bp = parse_blueprint(loop_doc({"condition": "counter < 3", "maxIterations": 10}))
    node = bp.node_map["loop"]
    spec = node.spec
    assert isinstance(spec, LoopSpec)
    assert spec.condition is not None and spec.condition.source == "counter < 3"
    assert spec.condition.names == frozenset({"counter"})
    assert spec.max_iterations == 10
    assert loop_condition(node) is spec.condition  # one compile cache for both


@pytest.mark.parametrize("params", [{}, {"maxIterations": None, "condition": None}])
def test_loop_spec_defaults(params: dict[str, Any]) -> None:
    # maxIterations: null is valid at load and means the default (the engine's int(None) would raise)
    spec = parse_blueprint(loop_doc(params)).node_map["loop"].spec
    assert spec == LoopSpec(condition=None, max_iterations=DEFAULT_MAX_ITERATIONS)
    assert DEFAULT_MAX_ITERATIONS == 1000


@pytest.mark.parametrize(
    ("duration", "ms"), [(0, 0), (1.2, 2), ("500ms", 500), ("30s", 30_000), ("1d", 86_400_000)]
)
def test_sleep_spec(duration: Any, ms: int) -> None:
    spec = one_node("sleep", {"duration": duration}).node_map["n"].spec
    assert spec == SleepSpec(duration_ms=ms)
    assert spec.duration_ms == parse_duration_ms(duration)


def test_batch_spec() -> None:
    assert one_node("batch", {"worker": "notify"}, registry=REGISTRY).node_map["n"].spec == BatchSpec(
        "notify"
    )
    # the worker's registration is checked only with a registry; the spec does not depend on it
    assert one_node("batch", {"worker": "later"}).node_map["n"].spec == BatchSpec("later")


def test_subflow_spec() -> None:
    params = {"blueprintId": "child", "inputs": {"order": "order"}, "outputs": {"total": "sum"}}
    node = one_node("subflow", params, known_blueprint_ids={"child"}).node_map["n"]
    assert node.spec == SubflowSpec("child", {"order": "order"}, {"total": "sum"})
    assert node.params == params  # params stay the document's: a node function may read them


def test_subflow_spec_keeps_not_given_apart_from_empty() -> None:
    # the engine seeds the child with {} for inputs: {} but with the node's input when inputs is absent
    assert one_node("subflow", {"blueprintId": "c"}).node_map["n"].spec == SubflowSpec("c", None, None)
    spec = one_node("subflow", {"blueprintId": "c", "inputs": {}, "outputs": {}}).node_map["n"].spec
    assert spec == SubflowSpec("c", {}, {})


def test_subflow_spec_mappings_are_copies() -> None:
    inputs = {"a": "b"}
    node = one_node("subflow", {"blueprintId": "c", "inputs": inputs}).node_map["n"]
    inputs["x"] = "y"
    assert isinstance(node.spec, SubflowSpec) and node.spec.inputs == {"a": "b"}


@pytest.mark.parametrize(("uses", "params"), [("wait", None), ("notify", {"duration": "5s"})])
def test_no_spec(uses: str, params: Any) -> None:
    assert one_node(uses, params).node_map["n"].spec is None


def test_specs_are_frozen() -> None:
    spec = SleepSpec(5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.duration_ms = 6  # type: ignore[misc]


@pytest.mark.parametrize(
    ("uses", "params", "problem"),
    [
        ("sleep", {"duration": "5 min"}, "nodes[0].params.duration: invalid duration '5 min'"),
        ("batch", {"worker": "wait"}, "nodes[0].params.worker: 'wait' is a built-in"),
        (
            "subflow",
            {"blueprintId": "c", "outputs": {"k": 1}},
            "nodes[0].params.outputs.k: must map a string",
        ),
        (
            "loop-controller",
            {"maxIterations": True},
            "nodes[0].params.maxIterations: must be an integer >= 1",
        ),
    ],
)
def test_invalid_params_build_no_blueprint(uses: str, params: dict[str, Any], problem: str) -> None:
    with pytest.raises(BlueprintError) as info:
        one_node(uses, params, source="bp.yaml")
    assert any(p.startswith(f"bp.yaml: {problem}") for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("folder", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_every_example_built_in_has_the_spec_of_its_params(folder: str) -> None:
    for bp in load_blueprints([EXAMPLES / folder]).values():
        for node in bp.nodes:
            params, spec = node.params, node.spec
            if node.uses == "loop-controller":
                assert isinstance(spec, LoopSpec)
                assert spec.max_iterations == params.get("maxIterations", DEFAULT_MAX_ITERATIONS)
                assert spec.condition == loop_condition(node)
            elif node.uses == "sleep":
                assert spec == SleepSpec(parse_duration_ms(params["duration"]))
            elif node.uses == "batch":
                assert spec == BatchSpec(params["worker"])
            elif node.uses == "subflow":
                assert spec == SubflowSpec(params["blueprintId"], params.get("inputs"), params.get("outputs"))
            else:
                assert spec is None


def test_the_model_and_the_parser_do_not_import_yaml() -> None:
    code = (
        "import sys, flowcraft_cli.blueprint, flowcraft_cli.loading as l\n"
        "assert 'yaml' not in sys.modules, 'imported yaml'\n"
        "l.parse_blueprint({'id': 't', 'nodes': [{'id': 'a', 'uses': 'sleep', 'params': {'duration': '1s'}}]})\n"
        "assert 'yaml' not in sys.modules, 'parsing imported yaml'\n"
        "l.load_blueprints\n"
        "assert 'yaml' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
