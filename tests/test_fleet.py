"""Fleet views and worker telemetry (CONTRACT §10), end to end: the real `flowcraft` CLI, real worker
processes and a real redis-server: `workers`, `queue`, `worker start --metrics-port`, `--log-format json`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import textwrap
import time
import urllib.request

import pytest
import redis as redis_lib

from tests.e2e import NODES, Project, wait_for

FAILING_NODE = '''

@node("boom")
def boom(ctx):
    raise ValueError(f"save target is read-only (attempt {ctx.attempt})")
'''

EXTRA = {
    "boomer": textwrap.dedent("""
        nodes:
          - {id: first, uses: noop}
          - {id: breaks, uses: boom, config: {maxRetries: 2, retryDelay: 10}}
        edges:
          - {source: first, target: breaks}
    """),
    "long": "nodes:\n  - {id: nap, uses: slow, params: {seconds: 60}}\n",
}


@pytest.fixture
def project(tmp_path, redis_url):
    redis_lib.Redis.from_url(redis_url).flushdb()
    p = Project(tmp_path, redis_url, lease=3, shutdown_wait=1, extra_blueprints=EXTRA)
    (tmp_path / "e2e_nodes.py").write_text(NODES + FAILING_NODE)
    yield p
    p.stop_all()


def test_workers_lists_live_workers_and_a_killed_one_as_lost(project):
    procs = [project.start_worker() for _ in range(3)]
    doc = wait_for(lambda: len((d := project.cli_json("workers"))["workers"]) == 3 and d, 30, "three workers")
    assert doc["queue"] == project.queue and doc["lease_seconds"] == 3
    by_pid = {w["pid"]: w for w in doc["workers"]}
    assert set(by_pid) == {p.pid for p in procs}
    for w in doc["workers"]:
        assert w["status"] == "alive" and w["queue"] == project.queue and w["host"] == socket.gethostname()
        assert w["concurrency"] == 8 and w["steps_running"] == 0 and w["started_at"]
        assert set(w["blueprints"]) == {"wide", "chain", "routed", "boomer", "long"}
        assert 0 <= w["heartbeat_age_ms"] <= 3000

    victim = procs[2]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    def lost_shown() -> dict | None:
        d = project.cli_json("workers")
        return d if any(w["status"] == "lost" for w in d["workers"]) else None

    doc = wait_for(lost_shown, 30, "the killed worker to show as lost", interval=0.2)
    status = {w["pid"]: w["status"] for w in doc["workers"]}
    assert status == {procs[0].pid: "alive", procs[1].pid: "alive", victim.pid: "lost"}
    lost = next(w for w in doc["workers"] if w["status"] == "lost")
    assert lost["heartbeat_age_ms"] > 3000 and lost["host"] == socket.gethostname()

    table = project.cli("workers")
    assert table.returncode == 0, table.stderr
    assert f"workers on queue {project.queue}" in table.stdout
    for w in doc["workers"][:2]:
        assert w["worker_id"] in table.stdout
    # a lost worker is shown for one lease after its own lease lapsed, then no more
    wait_for(lambda: len(project.cli_json("workers")["workers"]) == 2, 30, "the lost worker to drop out")


def test_workers_needs_only_the_redis_url_and_queue(project, tmp_path_factory):
    project.start_worker()
    empty = tmp_path_factory.mktemp("elsewhere")
    import subprocess
    import sys

    env = {**project.env(), "FLOWCRAFT_REDIS_URL": project.redis_url, "FLOWCRAFT_QUEUE": project.queue}
    proc = subprocess.run([sys.executable, "-m", "flowcraft_cli", "workers", "--json"], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [w["status"] for w in json.loads(proc.stdout)["workers"]] == ["alive"]
    proc = subprocess.run([sys.executable, "-m", "flowcraft_cli", "queue", "--json"], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["queue"] == project.queue


def _enqueue_deferred(redis_url: str, queue: str) -> str:
    from redis.asyncio import Redis

    from flowcraft_cli.distributed.queue import ArqQueue, arq_pool_for
    from flowcraft_cli.jobs import Job

    async def go() -> str:
        redis = Redis.from_url(redis_url)
        q = ArqQueue(arq_pool_for(redis, queue), queue)
        job = Job("not-yet", "later", 1, not_before_ms=int(time.time() * 1000) + 3_600_000)
        try:
            assert await q.enqueue([job]) == [job.job_id]
        finally:
            await q.close()
            await redis.aclose()
        return job.job_id

    return asyncio.run(go())


def test_queue_counts_ready_deferred_and_in_progress(project, redis_url):
    empty = project.cli_json("queue")
    assert empty == {"queue": project.queue, "ready": 0, "deferred": 0, "in_progress": 0, "oldest_ready_age_ms": None}

    _enqueue_deferred(redis_url, project.queue)
    project.cli("enqueue", "long", check=True)  # no worker yet: its start node's job waits, ready
    counts = project.cli_json("queue")
    assert (counts["ready"], counts["deferred"], counts["in_progress"]) == (1, 1, 0), counts
    assert counts["oldest_ready_age_ms"] is not None and counts["oldest_ready_age_ms"] >= 0
    table = project.cli("queue")
    assert table.returncode == 0 and "ready" in table.stdout and "deferred" in table.stdout

    project.start_worker()  # takes the ready job and runs it (a 60 s node); the deferred one stays
    counts = wait_for(lambda: (c := project.cli_json("queue"))["in_progress"] == 1 and c, 30, "the job to run")
    assert (counts["ready"], counts["deferred"], counts["oldest_ready_age_ms"]) == (0, 1, None), counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    """Samples of the /metrics page: 'name{labels}' -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_port_serves_counters_that_follow_runs(project):
    port = _free_port()
    project.start_worker("--metrics-port", str(port))
    assert f"http://127.0.0.1:{port}/metrics" in (project.root / "worker0.out").read_text()
    before = _scrape(port)
    assert before[f'flowcraft_queue_jobs{{queue="{project.queue}",state="ready"}}'] == 0
    assert before["flowcraft_worker_steps_running"] == 0
    assert not any(k.startswith("flowcraft_steps_started_total") for k in before)

    assert project.cli_json("enqueue", "chain", "--wait", "--timeout", "60")["status"] == "completed"
    assert project.cli_json("enqueue", "boomer", "--wait", "--timeout", "60")["status"] == "failed"

    def settled() -> dict[str, float] | None:
        m = _scrape(port)
        done = m.get('flowcraft_runs_finished_total{blueprint="boomer",status="failed"}') == 1
        return m if done and m.get('flowcraft_runs_finished_total{blueprint="chain",status="completed"}') == 1 \
            else None

    after = wait_for(settled, 30, "the runs to show in the metrics", interval=0.2)
    for node in ("start", "slow", "side", "join"):
        assert after[f'flowcraft_steps_started_total{{blueprint="chain",node="{node}"}}'] == 1
        assert after[f'flowcraft_steps_completed_total{{blueprint="chain",node="{node}"}}'] == 1
        assert after[f'flowcraft_step_duration_seconds_count{{blueprint="chain",node="{node}",outcome="completed"}}'] == 1
    assert after['flowcraft_step_duration_seconds_sum{blueprint="chain",node="slow",outcome="completed"}'] >= 1.5
    assert after['flowcraft_steps_started_total{blueprint="boomer",node="breaks"}'] == 2
    assert after['flowcraft_steps_failed_total{blueprint="boomer",node="breaks"}'] == 2
    assert 'flowcraft_steps_completed_total{blueprint="boomer",node="breaks"}' not in after
    assert after['flowcraft_steps_completed_total{blueprint="boomer",node="first"}'] == 1


def test_metrics_count_a_lost_step_on_the_worker_that_recovers_it(project):
    victim = project.start_worker()
    run_id = project.cli("enqueue", "long", check=True).stdout.strip()
    wait_for(lambda: project.cli_json("inspect", run_id)["nodes"][0]["status"] == "running", 30, "the node to run")
    port = _free_port()
    project.start_worker("--metrics-port", str(port))
    os.kill(victim.pid, signal.SIGKILL)  # its step is recovered, ~lease later, by the worker with metrics
    m = wait_for(lambda: (s := _scrape(port)).get('flowcraft_steps_lost_total{blueprint="long",node="nap"}') and s,
                 60, "the lost step to be counted", interval=0.2)
    assert m['flowcraft_steps_lost_total{blueprint="long",node="nap"}'] == 1
    wait_for(lambda: _scrape(port).get('flowcraft_steps_started_total{blueprint="long",node="nap"}') == 1, 30,
             "the recovered step to start again here")


def test_json_logs_parse_and_a_failed_attempt_logs_once_with_its_traceback(project):
    project.start_worker("--log-format", "json")
    assert project.cli_json("enqueue", "boomer", "--wait", "--timeout", "60")["status"] == "failed"
    project.stop_all()
    lines = [line for line in project.worker_log(0).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for r in records:
        assert {"ts", "level", "logger", "message"} <= set(r), r
    failed = [r for r in records if r["level"] == "WARNING" and r.get("node_id") == "breaks"]
    assert [r["attempt"] for r in failed] == [1, 2]  # each failed attempt once
    for r in failed:
        assert r["logger"] == "flowcraft.engine" and r["run_id"]
        assert r["error"].startswith("ValueError: save target is read-only")
        assert str(project.root / "e2e_nodes.py") in r["traceback"] and "in boom" in r["traceback"]
        assert "\n" not in r["message"]  # the traceback is its own field
    arq = [r for r in records if r["logger"] == "arq.worker"]
    assert arq, "arq's own lines are JSON too"
    ends = [r["message"] for r in arq if "←" in r["message"]]
    assert sum("✗" in m and "breaks" in m for m in ends) == 2, ends
    assert not any("●" in m and "failed:" in m for m in ends), ends
    assert any(r["message"] == "worker stopped" for r in records)
