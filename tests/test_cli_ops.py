"""CONTRACT §10 and the walkthrough's polish, through the real ``flowcraft`` CLI: one run document for
``run``/``enqueue --wait``/``inspect``, attempts with tracebacks, ``inspect --node``, ``--watch`` as JSON Lines
or plain lines, ``reconcile --interval`` as a log, help and version, Ctrl-C, cancelled nodes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import redis as redis_lib

from tests.e2e import Project, wait_for

FLAKY_NODES = '''

@node("flaky")
def flaky(ctx):
    if ctx.attempt < 2:
        raise ValueError(f"attempt {ctx.attempt} of {ctx.node_id} is not enough")
    return {"ok": ctx.attempt}

@node("late")
async def late(ctx):
    if ctx.attempt == 1:
        await asyncio.sleep(30)  # far past its timeout: attempt 1 times out, attempt 2 returns at once
    return "in time"

@node("scatter")
async def scatter(ctx):
    for key in ("zeta", "alpha", "mid"):
        await ctx.context.set(key, key.upper())
    return "set"
'''

DOCS = {
    "retried": textwrap.dedent("""
        nodes:
          - {id: first, uses: noop}
          - {id: shaky, uses: flaky, config: {maxRetries: 3}}
          - {id: slowpoke, uses: late, config: {maxRetries: 2, timeout: 300}}
          - {id: keys, uses: scatter}
        edges:
          - {source: first, target: shaky}
          - {source: shaky, target: slowpoke}
          - {source: slowpoke, target: keys}
    """),
    "review": textwrap.dedent("""
        nodes:
          - {id: w, uses: wait}
          - {id: nap, uses: sleep, params: {duration: 1h}}
          - {id: after, uses: noop}
        edges:
          - {source: w, target: after, action: approve}
    """),
}
ATTEMPT_KEYS = {"attempt", "worker", "started_at", "finished_at", "outcome", "error", "traceback"}


@pytest.fixture
def project(tmp_path, redis_url):
    redis_lib.Redis.from_url(redis_url).flushdb()
    p = Project(tmp_path, redis_url, extra_blueprints=DOCS)
    (tmp_path / "e2e_nodes.py").write_text((tmp_path / "e2e_nodes.py").read_text() + FLAKY_NODES)
    yield p
    p.stop_all()


def _shape(doc):
    """Keys of a run document, its nodes and their attempts: what must not differ between commands."""
    return (sorted(doc), sorted({k for n in doc["nodes"] for k in n} - {"detail"}),
            sorted({k for n in doc["nodes"] for a in n["attempts_history"] for k in a}))


def test_run_enqueue_and_inspect_print_one_document(project):
    local = project.cli("run", "retried", "--json")
    assert local.returncode == 0, local.stderr
    local_doc = json.loads(local.stdout)
    project.start_worker()
    remote = project.cli_json("enqueue", "retried", "--wait", "--timeout", "60")
    inspected = project.cli_json("inspect", remote["run_id"])
    assert local_doc["status"] == remote["status"] == inspected["status"] == "completed"
    assert _shape(local_doc) == _shape(remote) == _shape(inspected)
    assert {k: v for k, v in remote.items()} == inspected  # nothing more, nothing less, the same values
    for doc in (local_doc, inspected):
        assert [n["node_id"] for n in doc["nodes"]] == ["first", "shaky", "slowpoke", "keys"]
        nodes = {n["node_id"]: n for n in doc["nodes"]}
        shaky = nodes["shaky"]["attempts_history"]
        assert [a["outcome"] for a in shaky] == ["failed", "completed"]
        assert all(set(a) == ATTEMPT_KEYS for a in shaky)
        assert shaky[0]["error"] == "ValueError: attempt 1 of shaky is not enough"
        assert "e2e_nodes.py" in shaky[0]["traceback"] and "flowcraft_cli" not in shaky[0]["traceback"]
        assert shaky[1]["traceback"] is None and shaky[0]["started_at"] and shaky[0]["finished_at"]
        assert [a["outcome"] for a in nodes["slowpoke"]["attempts_history"]] == ["timed_out", "completed"]
        assert nodes["first"]["attempts_history"][0]["worker"]
    assert inspected["nodes"][0]["attempts_history"][0]["worker"] != "local"


def test_inspect_node_shows_its_attempts_and_tracebacks(project):
    project.start_worker()
    run_id = project.cli_json("enqueue", "retried", "--wait", "--timeout", "60")["run_id"]
    node = project.cli_json("inspect", run_id, "--node", "shaky")
    whole = project.cli_json("inspect", run_id)
    assert node == next(n for n in whole["nodes"] if n["node_id"] == "shaky")
    table = project.cli("inspect", run_id, "--node", "shaky")
    assert table.returncode == 0, table.stderr
    assert "attempt 1 traceback:" in table.stdout and "e2e_nodes.py" in table.stdout
    assert "ValueError: attempt 1 of shaky is not enough" in table.stdout and "completed" in table.stdout
    unknown = project.cli("inspect", run_id, "--node", "nope")
    assert unknown.returncode == 2 and unknown.stderr.startswith(f"error: run '{run_id}' has no node 'nope'")


def _popen(project, *args):
    return subprocess.Popen([sys.executable, "-m", "flowcraft_cli", *args], cwd=project.root, env=project.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_inspect_watch_json_lines_and_plain_lines(project):
    run_id = project.cli("enqueue", "chain", check=True).stdout.strip()  # no worker yet: it waits, queued
    as_json = _popen(project, "inspect", run_id, "--watch", "--json")
    as_lines = _popen(project, "inspect", run_id, "--watch")
    wait_for(lambda: project.cli_json("inspect", run_id)["nodes"][0]["status"] == "queued", 30, "the run to queue")
    project.start_worker()
    out, err = as_json.communicate(timeout=90)
    assert as_json.returncode == 0, err
    docs = [json.loads(line) for line in out.splitlines()]  # every line one document
    assert len(docs) >= 2 and docs[0]["status"] == "running" and docs[-1]["status"] == "completed"
    assert all(a != b for a, b in zip(docs, docs[1:], strict=False))  # one per change
    out, err = as_lines.communicate(timeout=90)
    assert as_lines.returncode == 0, err
    lines = out.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert all(re.match(stamp + " (node|run) ", line) for line in lines), lines
    assert any(re.search("node slow (running|completed)$", line) for line in lines), lines
    assert lines[-1].endswith(f"run {run_id} completed")
    assert "\x1b" not in out  # a log, not a redrawn screen


def test_reconcile_interval_logs_one_line_per_sweep(project):
    proc = _popen(project, "reconcile", "--interval", "0.2")
    lines: list[str] = []
    try:
        def two_sweeps():
            lines.append(proc.stdout.readline())
            return len(lines) >= 2
        wait_for(two_sweeps, 30, "two sweeps")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    for line in lines[:2]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z sweep scanned_keys=\d+ stalled_runs=0 reconciled_runs=0 "
                            r"failed_runs=0\n", line), line


def test_cancel_shows_waiting_and_queued_nodes_as_cancelled(project):
    project.start_worker()
    run_id = project.cli("enqueue", "review", check=True).stdout.strip()
    wait_for(lambda: [n["status"] for n in project.cli_json("inspect", run_id)["nodes"]][:2]
             == ["awaiting", "sleeping"], 30, "the wait and the sleep to start", interval=0.3)
    assert project.cli("cancel", run_id).returncode == 0
    view = project.cli_json("inspect", run_id)
    assert view["status"] == "cancelled"
    assert {n["node_id"]: n["status"] for n in view["nodes"]} == {"w": "cancelled", "nap": "cancelled",
                                                                 "after": "pending"}
    project.stop_all()
    queued = project.cli("enqueue", "routed", check=True).stdout.strip()  # no worker: its start node waits
    assert project.cli("cancel", queued).returncode == 0
    assert project.cli_json("inspect", queued)["nodes"][0]["status"] == "cancelled"
    human = project.cli("inspect", queued)
    assert "cancelled" in human.stdout and "failed" not in human.stdout


def test_enqueue_wait_interrupted_exits_130_and_says_how_to_follow(project):
    proc = _popen(project, "enqueue", "chain", "--wait")  # no worker: it waits for ever
    err_lines: list[str] = []
    wait_for(lambda: err_lines.append(proc.stderr.readline()) or "waiting" in err_lines[-1], 30, "the wait")
    run_id = err_lines[-1].split()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert f"flowcraft inspect {run_id} --watch" in err and "Traceback" not in err
    assert project.cli_json("inspect", run_id)["status"] == "running"  # the run itself goes on


def test_run_and_enqueue_go_on_past_a_broken_file_but_the_worker_refuses(project):
    (project.root / "blueprints" / "broken.yaml").write_text("nodes: [{id: a, uses: nope}]\n")
    run = project.cli("run", "routed", "--json")
    assert run.returncode == 0 and json.loads(run.stdout)["status"] == "completed", run.stderr
    assert run.stderr.startswith("warning: ") and "broken.yaml" in run.stderr
    enq = project.cli("enqueue", "routed")
    assert enq.returncode == 0 and "broken.yaml" in enq.stderr, enq.stderr
    broken = project.cli("run", "broken")
    assert broken.returncode == 2 and broken.stderr.startswith("error: ") and "broken.yaml" in broken.stderr
    worker = project.cli("worker", "start", "--burst")
    assert worker.returncode == 2 and "broken.yaml" in worker.stderr
    assert project.cli("validate").returncode == 2


def test_redis_database_out_of_range(project):
    cfg = project.root / "flowcraft.yaml"
    cfg.write_text(cfg.read_text().replace(project.redis_url, _with_db(project.redis_url, 99)))
    r = project.cli("enqueue", "routed")
    assert r.returncode == 2, r.stderr
    assert "database index 99 is out of range" in r.stderr and "is redis-server running" not in r.stderr


def _with_db(url: str, db: int) -> str:
    if url.startswith("unix://"):
        base = re.sub(r"([?&])db=\d+", "", url).rstrip("?&")
        return f"{base}{'&' if '?' in base else '?'}db={db}"
    return re.sub(r"(/\d+)?$", f"/{db}", url, count=1)


def test_messages_name_json_types_not_python_ones(project):
    (project.root / "blueprints" / "batchy.yaml").write_text("nodes: [{id: b, uses: batch, params: {worker: noop}}]\n")
    r = project.cli("run", "batchy", "--input", "{}", "--json")
    assert r.returncode == 1
    reason = json.loads(r.stdout)["reason"]
    assert "must be a list, got object" in reason and "dict" not in reason
    bad = project.cli("run", "routed", "--input", "[1]")
    assert bad.returncode == 2 and "got array" in bad.stderr and "list" not in bad.stderr


def test_context_table_is_sorted(project):
    r = project.cli("run", "retried")
    assert r.returncode == 0, r.stderr
    context = r.stdout[r.stdout.index("context"):]
    keys = [k for k in ("_outputs.first", "_outputs.keys", "alpha", "mid", "zeta") if k in context]
    assert keys == ["_outputs.first", "_outputs.keys", "alpha", "mid", "zeta"]
    assert [context.index(k) for k in keys] == sorted(context.index(k) for k in keys)


def test_version_short_help_and_help_text(project):
    version = project.cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"flowcraft \S+\n", version.stdout)
    for args in ((), ("inspect",), ("enqueue",), ("worker",), ("worker", "start"), ("reconcile",)):
        short, long = project.cli(*args, "-h"), project.cli(*args, "--help")
        assert short.returncode == long.returncode == 0 and short.stdout == long.stdout, args
        assert "<bool>" not in short.stdout, (args, short.stdout)
    words = " ".join(re.sub(r"[│╭╮╰╯─]", " ", project.cli("worker", "start", "-h").stdout).split())
    assert "(default: worker.concurrency, 10)" in words


def test_every_argument_and_option_has_help():
    from typer.main import get_command

    from flowcraft_cli.cli.app import app

    def walk(cmd, path):
        for p in cmd.params:
            yield path, p
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, (*path, name))

    missing = [(path, p.name) for path, p in walk(get_command(app), ()) if not getattr(p, "help", None)]
    assert missing == []
