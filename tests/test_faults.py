"""A run survives every single fault an operator meets (issue: reconciler and fault tolerance). Each test
uses real worker processes and a real redis-server; where Redis itself is the fault, a private one."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import redis as redis_lib

from tests.e2e import Project, slow_fan_yaml, wait_for
from tests.redis_server import RedisServer

SLOW_JOIN = """
nodes:
  - {id: start, uses: noop}
  - {id: a, uses: noop, params: {log: "LOG"}}
  - {id: b, uses: noop, params: {log: "LOG"}}
  - {id: join, uses: slow, params: {seconds: 1.5, log: "LOG"}}
  - {id: end, uses: noop, params: {log: "LOG"}}
edges:
  - {source: start, target: a}
  - {source: start, target: b}
  - {source: a, target: join}
  - {source: b, target: join}
  - {source: join, target: end}
"""

BIG = """
nodes:
  - {id: make, uses: big}
  - {id: measure, uses: measure}
edges:
  - {source: make, target: measure}
"""

NODES_EXTRA = '''

@node("big")
async def big(ctx):
    await ctx.context.set("blob", "x" * (6 * 1024 * 1024))
    return {"payload": "y" * (4 * 1024 * 1024)}

@node("measure")
async def measure(ctx):
    return {"input": len(ctx.input["payload"]), "blob": len(await ctx.context.get("blob"))}
'''


def _count(project, prefix):
    return sum(1 for line in project.calls() if line.startswith(prefix))


def _no_key_without_ttl(url):
    r = redis_lib.Redis.from_url(url)
    keys = [k for k in r.scan_iter("*") if k.startswith((b"workflow:", b"flowcraft:")) and not k.startswith(b"flowcraft:coord")]
    return [k for k in keys if r.ttl(k) < 0]


@pytest.fixture
def project(tmp_path, redis_url):
    redis_lib.Redis.from_url(redis_url).flushdb()
    p = Project(tmp_path, redis_url, job_timeout=5)
    (tmp_path / "blueprints" / "slow-join.yaml").write_text(SLOW_JOIN.replace("LOG", str(p.log)))
    yield p
    p.stop_all()


def test_sigkill_mid_join(project, redis_url):
    w0 = project.start_worker()
    run_id = project.cli("enqueue", "slow-join", check=True).stdout.strip()
    wait_for(lambda: _count(project, "join start") == 1, 30, "the join to start")
    w0.send_signal(signal.SIGKILL)
    w0.wait()
    project.start_worker()
    view = project.wait_run(run_id)  # arq redelivers after job timeout (5 s) + 10 s
    assert view["status"] == "completed"
    assert _count(project, "join start") == 2 and _count(project, "join end") == 1
    assert _count(project, "end run") == 1 and _count(project, "a run") == 1 and _count(project, "b run") == 1
    assert _no_key_without_ttl(redis_url) == []


def test_crash_right_after_a_commit_loses_nothing(project, redis_url):
    """The commit queues the jobs it decides, or claims the successor its worker runs next (inline), in the
    same atomic call: once they waited in the run's outbox for the worker to queue them, and a crash in
    between left them to the reconciler. A worker killed right after committing the join leaves `end`
    claimed under its name, listed in its list of steps: a new worker recovers it, no sweep needed. (`end` is
    slow here: a quick one would have run ahead of the join's commit and been committed with it.)"""
    doc = SLOW_JOIN.replace("{id: end, uses: noop,", "{id: end, uses: slow, params: {seconds: 0.3, log: \"LOG\"}} #")
    (project.root / "blueprints" / "slow-end.yaml").write_text(doc.replace("LOG", str(project.log)))
    w0 = project.start_worker(env={"FLOWCRAFT_FAILPOINT": "after-commit:join"})
    run_id = project.cli("enqueue", "slow-end", check=True).stdout.strip()
    assert w0.wait(timeout=60) == 137  # died right after committing the join's result
    view = project.cli_json("inspect", run_id)
    statuses = {n["node_id"]: n["status"] for n in view["nodes"]}
    assert statuses["join"] == "completed" and statuses["end"] == "running"
    project.start_worker()
    view = project.wait_run(run_id)
    assert view["status"] == "completed"
    assert _count(project, "join end") == 1 and _count(project, "end end") == 1
    assert [e["node_id"] for e in view["timeline"] if e["outcome"] == "lost"] == ["end"]


def test_redis_restart_with_aof_mid_run(tmp_path):
    server = RedisServer(appendonly=True, extra=["--appendfsync", "always"])
    try:
        project = Project(tmp_path, server.url, job_timeout=5)
        (tmp_path / "blueprints" / "slow-join.yaml").write_text(SLOW_JOIN.replace("LOG", str(project.log)))
        project.start_worker()
        run_id = project.cli("enqueue", "slow-join", check=True).stdout.strip()
        wait_for(lambda: _count(project, "join start") == 1, 30, "the join to start")
        server.stop()  # SIGTERM: Redis writes its AOF and exits
        server.start()
        view = project.wait_run(run_id)
        assert view["status"] == "completed", view
        assert _count(project, "end run") == 1 and _count(project, "join end") >= 1
        assert _no_key_without_ttl(server.url) == []
        project.stop_all()
    finally:
        server.close()


def test_redis_restart_while_slots_run_claimed_branches(tmp_path):
    """A fan-out on 8 slots whose commits claim queued siblings for their slots and take jobs out of the queue:
    Redis restarts (AOF) mid-fan, so commits in flight fail, some after they applied (their reply lost). The
    run completes on the same worker, no branch is left behind, and the join runs once."""
    server = RedisServer(appendonly=True, extra=["--appendfsync", "always"])
    try:
        project = Project(tmp_path, server.url, job_timeout=30, lease=3)
        branches = [f"b{i:02d}" for i in range(20)]
        (tmp_path / "blueprints" / "slow-fan.yaml").write_text(slow_fan_yaml(project.log, branches, seconds=0.5))
        worker = project.start_worker()
        run_id = project.cli("enqueue", "slow-fan", check=True).stdout.strip()
        wait_for(lambda: sum(1 for c in project.calls() if c.split()[1:2] == ["start"]) >= 11, 60, "a second wave")
        server.stop()  # SIGTERM: Redis writes its AOF and exits
        server.start()
        view = project.wait_run(run_id, timeout=60)
        assert view["status"] == "completed", view
        assert worker.poll() is None
        assert {c.split()[0] for c in project.calls() if c.split()[1:2] == ["end"]} == set(branches)
        assert _count(project, "join run") == 1
        assert _no_key_without_ttl(server.url) == []
        project.stop_all()
    finally:
        server.close()


def test_redis_paused_for_seconds(tmp_path):
    server = RedisServer()
    try:
        project = Project(tmp_path, server.url, job_timeout=10)
        (tmp_path / "blueprints" / "slow-join.yaml").write_text(SLOW_JOIN.replace("LOG", str(project.log)))
        worker = project.start_worker()
        run_id = project.cli("enqueue", "slow-join", check=True).stdout.strip()
        wait_for(lambda: _count(project, "join start") == 1, 30, "the join to start")
        server.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: _count(project, "join end") == 1, 30, "the join to finish its sleep while Redis is paused")
        finally:
            server.proc.send_signal(signal.SIGCONT)
        view = project.wait_run(run_id)
        assert view["status"] == "completed"
        assert worker.poll() is None
        assert _count(project, "end run") == 1
        project.stop_all()
    finally:
        server.close()


def test_several_mb_context_value(project):
    (project.root / "e2e_nodes.py").write_text((project.root / "e2e_nodes.py").read_text() + NODES_EXTRA)
    (project.root / "blueprints" / "big.yaml").write_text(BIG)
    project.start_worker()
    result = project.cli_json("enqueue", "big", "--wait", "--timeout", "60")
    assert result["status"] == "completed"
    assert result["outputs"]["measure"] == {"input": 4 * 1024 * 1024, "blob": 6 * 1024 * 1024}


def test_blueprint_file_changed_under_a_run(project):
    run_id = project.cli("enqueue", "routed", check=True).stdout.strip()
    path = project.root / "blueprints" / "routed.yaml"
    path.write_text(path.read_text().replace("{id: c, uses: noop}", "{id: c, uses: noop, params: {v: 2}}"))
    project.start_worker()  # this worker has the edited blueprint: another version
    view = project.wait_run(run_id, timeout=60)
    assert view["status"] == "failed"
    assert "version" in view["reason"] and view["blueprint_version"] in view["reason"]
    a = next(n for n in view["nodes"] if n["node_id"] == "a")
    assert a["status"] == "failed" and a["error"].startswith("stopped") and a["attempts"] == 1  # never ran
    assert "a" not in view["outputs"]  # nothing ran against the new code


def test_worker_that_cannot_reach_redis_at_start(tmp_path):
    (tmp_path / "flowcraft.yaml").write_text(textwrap.dedent("""
        redis: {url: "redis://:pw@127.0.0.1:1/0"}
        blueprints: []
    """))
    r = subprocess.run([sys.executable, "-m", "flowcraft_cli", "worker", "start"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot reach Redis at redis://:***@127.0.0.1:1/0")
