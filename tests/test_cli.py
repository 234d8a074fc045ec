"""The CLI's contract for bad input (CONTRACT §8): one line per problem naming the file and the field, exit 2,
no traceback; plus `run`, `validate`, `graph` on a good project."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

NODES = """
from flowcraft_cli import node

@node("step")
def step(ctx):
    return ctx.input
"""

GOOD = """
id: good
nodes:
  - {id: a, uses: step}
  - {id: b, uses: step}
edges:
  - {source: a, target: b, condition: "result.output.go"}
"""


def cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "flowcraft_cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def proj(tmp_path):
    (tmp_path / "blueprints").mkdir()
    (tmp_path / "nodes.py").write_text(NODES)
    (tmp_path / "flowcraft.yaml").write_text("blueprints: [./blueprints]\nregistry: [nodes]\n")
    (tmp_path / "blueprints" / "good.yaml").write_text(GOOD)
    return tmp_path


def test_run_validate_graph_on_a_good_project(proj):
    r = cli(proj, "run", "good", "--input", '{"go": true}', "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "completed" and doc["outputs"]["b"] == {"go": True}
    assert {"run_id", "blueprint_id", "blueprint_version", "status", "reason", "nodes", "context", "outputs"} <= set(doc)
    assert [n["node_id"] for n in doc["nodes"]] == ["a", "b"]
    human = cli(proj, "run", "good")
    assert human.returncode == 0 and "completed" in human.stdout and "skipped" in human.stdout
    assert "a running" in human.stderr  # live progress goes to stderr
    v = cli(proj, "validate")
    assert v.returncode == 0 and "good" in v.stdout
    g = cli(proj, "graph", "good")
    assert g.returncode == 0 and g.stdout.startswith("flowchart TD")


def test_run_moves_what_it_loaded_out_of_the_garbage_collector_s_way(proj):
    """The modules and the project, loaded before the run, live as long as the process: `flowcraft run` and
    `flowcraft worker start` freeze them (gc.freeze), so the collector's full passes walk only what the work made."""
    (proj / "nodes.py").write_text(NODES + """
import gc

@node("frozen")
def frozen(ctx):
    return gc.get_freeze_count()
""")
    (proj / "blueprints" / "frozen.yaml").write_text("id: frozen\nnodes: [{id: f, uses: frozen}]\nedges: []\n")
    r = cli(proj, "run", "frozen", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"]["f"] > 10_000


BAD = {
    "malformed-yaml": ("nodes: [\n  - {id: a\n", r"bad.yaml: line \d+"),
    "unknown-top-key": ("nodez: []\nnodes: [{id: a, uses: step}]\nedges: []\n", "nodez"),
    "duplicate-node": ("nodes: [{id: a, uses: step}, {id: a, uses: step}]\nedges: []\n", "nodes[1].id"),
    "missing-edge-target": ("nodes: [{id: a, uses: step}]\nedges: [{source: a, target: zz}]\n", "edges[0].target"),
    "unregistered-uses": ("nodes: [{id: a, uses: stepp}]\nedges: []\n", "did you mean 'step'"),
    "condition-syntax": ("nodes: [{id: a, uses: step}, {id: b, uses: step}]\n"
                         "edges: [{source: a, target: b, condition: 'result.output >'}]\n", "edges[0].condition"),
    "cycle": ("nodes: [{id: s, uses: step}, {id: a, uses: step}, {id: b, uses: step}]\n"
              "edges: [{source: s, target: a}, {source: a, target: b}, {source: b, target: a}]\n", "cycle"),
    "max-retries-zero": ("nodes: [{id: a, uses: step, config: {maxRetries: 0}}]\nedges: []\n",
                         "nodes[0].config.maxRetries"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_blueprint_is_one_line_exit_2(proj, case):
    text, expected = BAD[case]
    (proj / "blueprints" / "bad.yaml").write_text(text)
    for args in (("validate",), ("run", "bad")):
        r = cli(proj, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert lines and all(line.startswith("error: ") for line in lines)
        assert any("bad.yaml" in line for line in lines), lines
        import re

        assert re.search(expected if case == "malformed-yaml" else re.escape(expected), r.stderr), r.stderr
    # a run of another blueprint is not blocked by the broken file: it says so on stderr and goes on
    r = cli(proj, "run", "good", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "completed"
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("warning: ") and "bad.yaml" in line for line in lines), lines


def test_duplicate_blueprint_ids_across_files(proj):
    (proj / "blueprints" / "other.yaml").write_text("id: good\n" + GOOD.split("\n", 2)[2])
    r = cli(proj, "validate")
    assert r.returncode == 2 and "good.yaml" in r.stderr and "other.yaml" in r.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (("run", "good", "--input", "[1]"), "must be a JSON object"),
    (("run", "good", "--input", "{nope"), "invalid JSON at line 1 column 2"),
    (("run", "good", "--input-file", "missing.json"), "cannot read"),
    (("run", "nope"), "unknown blueprint id 'nope' (known: good)"),
    (("run",), "Missing argument"),
    (("run", "good", "--bogus"), "No such option"),
])
def test_bad_invocation_exit_2(proj, args, needle):
    r = cli(proj, *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_config_errors_name_file_and_key(proj):
    (proj / "flowcraft.yaml").write_text("blueprints: [./blueprints]\nregistry: [nodes]\nworkr: {concurrency: 2}\n")
    r = cli(proj, "validate")
    assert r.returncode == 2 and "flowcraft.yaml" in r.stderr and "workr" in r.stderr and "worker" in r.stderr


def test_failed_run_exits_1(proj):
    (proj / "nodes.py").write_text(NODES + textwrap.dedent("""
        @node("boom")
        def boom(ctx):
            raise RuntimeError("it broke")
    """))
    (proj / "blueprints" / "fails.yaml").write_text("nodes: [{id: x, uses: boom}]\nedges: []\n")
    r = cli(proj, "run", "fails", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["status"] == "failed" and "it broke" in doc["reason"]


@pytest.mark.parametrize(("args", "needle"), [
    (("enqueue", "good", "--run-id", "R::call.1.1"), "'::' is reserved for subflow child runs"),
    (("enqueue", "good", "--run-id", "a/b"), "run id 'a/b': '/' not allowed"),
    (("enqueue", "good", "--run-id", "x" * 129), "129 characters; at most 128 allowed"),
    (("run", "good", "--run-id", "a b"), "run id 'a b': ' ' not allowed"),
    (("inspect", "a*"), "run id 'a*': '*' not allowed"),
    (("resume", "a b", "--action", "go"), "run id 'a b': ' ' not allowed"),
    (("cancel", "a\nb"), "not allowed"),
])
def test_bad_run_id_is_one_line_exit_2(proj, args, needle):
    # refused before any connection is made: the project's Redis URL is never used
    (proj / "flowcraft.yaml").write_text("blueprints: [./blueprints]\nregistry: [nodes]\n"
                                         "redis: {url: 'redis://127.0.0.1:1/0'}\n")
    r = cli(proj, *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_a_long_child_run_id_is_looked_up(proj, redis_url):
    (proj / "flowcraft.yaml").write_text(f"blueprints: [./blueprints]\nregistry: [nodes]\nredis: {{url: '{redis_url}'}}\n")
    long_child = "R" + "::call.1.1" * 20  # nested subflows: longer than a user's 128 characters
    r = cli(proj, "inspect", long_child)
    assert r.returncode == 1 and r.stderr.startswith(f"error: run '{long_child}' not found"), r.stderr
