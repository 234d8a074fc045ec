"""End to end: the real ``flowcraft`` command, real worker processes, a real redis-server."""

from __future__ import annotations

import pickle
import signal
import textwrap
import time

import pytest
import redis as redis_lib

from tests.e2e import Project, wait_for


@pytest.fixture
def project(tmp_path, redis_url):
    redis_lib.Redis.from_url(redis_url).flushdb()
    p = Project(tmp_path, redis_url)
    yield p
    p.stop_all()


def test_two_workers_complete_a_run_and_inspect_shows_it(project):
    project.start_worker()
    project.start_worker()
    result = project.cli_json("enqueue", "chain", "--wait", "--timeout", "60", "--input", '{"order": 1}')
    assert result["status"] == "completed", result
    assert result["outputs"]["slow"] == {"slept": 1.5}
    assert result["outputs"]["join"] == ["side", "slow"]
    view = project.cli_json("inspect", result["run_id"])
    assert [n["node_id"] for n in view["nodes"]] == ["start", "slow", "side", "join"]
    for n in view["nodes"]:
        assert n["status"] == "completed" and n["attempts"] == 1
        assert n["duration_ms"] is not None and n["started_at"] and n["finished_at"]
    slow = next(n for n in view["nodes"] if n["node_id"] == "slow")
    from datetime import datetime

    started, finished = (datetime.fromisoformat(slow[k].replace("Z", "+00:00")) for k in ("started_at", "finished_at"))
    assert slow["duration_ms"] == round((finished - started).total_seconds() * 1000)  # the recorded interval
    assert [t["node_id"] for t in view["timeline"]].count("slow") == 1
    human = project.cli("inspect", result["run_id"])
    assert human.returncode == 0 and "completed" in human.stdout and "slow" in human.stdout


def test_wide_fan_out_completes_on_two_workers(project):
    project.start_worker()
    project.start_worker()
    result = project.cli_json("enqueue", "wide", "--wait", "--timeout", "60")
    assert result["status"] == "completed", result
    assert len(result["outputs"]["end"]) == 50


def test_a_wide_fan_out_of_real_work_spreads_over_both_workers(tmp_path, redis_url):
    """No-op branches may all run on the first worker (each of its slots claims the next queued branch as it
    commits one); branches that take time leave their queue jobs to the other worker's idle slots."""
    branches = "\n".join(f"  - {{id: b{i:02d}, uses: slow, params: {{seconds: 0.3}}}}" for i in range(20))
    edges = "\n".join(f"  - {{source: start, target: b{i:02d}}}\n  - {{source: b{i:02d}, target: end}}" for i in range(20))
    doc = f"nodes:\n  - {{id: start, uses: noop}}\n{branches}\n  - {{id: end, uses: join}}\nedges:\n{edges}\n"
    project = Project(tmp_path, redis_url, extra_blueprints={"wide-slow": doc})
    try:
        project.start_worker()
        project.start_worker()
        result = project.cli_json("enqueue", "wide-slow", "--wait", "--timeout", "60")
        assert result["status"] == "completed", result
        view = project.cli_json("inspect", result["run_id"])
        workers = {n["worker"] for n in view["nodes"]}
        assert len(workers) == 2, workers
    finally:
        project.stop_all()


def test_sigkill_mid_node_loses_nothing(project, redis_url):
    w0 = project.start_worker()
    run_id = project.cli("enqueue", "chain", check=True).stdout.strip()
    wait_for(lambda: any(line.startswith("slow start") for line in project.calls()), 30, "the slow node to start")
    w0.send_signal(signal.SIGKILL)
    w0.wait()
    project.start_worker()
    # arq redelivers a lost job when its lock lapses (job timeout 5 s + 10 s)
    view = wait_for(lambda: (v := project.cli_json("inspect", run_id))["status"] in ("completed", "failed") and v,
                    90, "the run to finish after the crash", interval=0.5)
    assert view["status"] == "completed", view
    calls = project.calls()
    assert calls.count(f"join run {w0.pid}") + sum(1 for c in calls if c.startswith("join run")) >= 1
    assert sum(1 for c in calls if c.startswith("join run")) == 1  # the join fired exactly once
    assert sum(1 for c in calls if c.startswith("slow end")) == 1  # the killed attempt never finished
    assert sum(1 for c in calls if c.startswith("slow start")) == 2
    assert view["outputs"]["join"] == ["side", "slow"]


def test_bad_input_writes_nothing(project, redis_url):
    r = redis_lib.Redis.from_url(redis_url)
    before = r.dbsize()
    unknown = project.cli("enqueue", "nope")
    assert unknown.returncode == 2 and "unknown blueprint id 'nope'" in unknown.stderr and "chain" in unknown.stderr
    bad_json = project.cli("enqueue", "chain", "--input", "[1, 2]")
    assert bad_json.returncode == 2 and "JSON object" in bad_json.stderr
    broken = project.cli("enqueue", "chain", "--input", "{oops")
    assert broken.returncode == 2 and "line 1 column 2" in broken.stderr
    assert r.dbsize() == before
    first = project.cli("enqueue", "routed", "--run-id", "fixed-id")
    assert first.returncode == 0
    keys_after_first = sorted(r.keys("*"))
    again = project.cli("enqueue", "routed", "--run-id", "fixed-id")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert sorted(r.keys("*")) == keys_after_first
    for proc in (unknown, bad_json, broken, again):
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_inspect_unknown_run_and_unreachable_redis(project, tmp_path):
    missing = project.cli("inspect", "no-such-run")
    assert missing.returncode == 1 and "not found" in missing.stderr
    cfg = tmp_path / "down.yaml"
    cfg.write_text((tmp_path / "flowcraft.yaml").read_text().replace(project.redis_url, "redis://:hunter2@127.0.0.1:1/0"))
    down = project.cli("enqueue", "chain", "--config", str(cfg))
    assert down.returncode == 1
    assert "redis://:***@127.0.0.1:1/0" in down.stderr and "hunter2" not in down.stderr
    assert "Traceback" not in down.stderr
    worker = project.cli("worker", "start", "--config", str(cfg), timeout=30)
    assert worker.returncode == 1 and "cannot reach Redis" in worker.stderr


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_pickle_job_in_queue_is_not_executed(project, redis_url):
    r = redis_lib.Redis.from_url(redis_url)
    payload = pickle.dumps({"t": 1, "f": "flowcraft_step", "a": [_Evil()], "k": {}, "et": 0})
    r.set("arq:job:evil", payload)
    r.zadd(project.queue, {"evil": int(time.time() * 1000)})  # arq skips a score of 0
    worker = project.cli("worker", "start", "--burst", timeout=60, check=True)
    assert not (project.root / "PWNED").exists()
    assert r.zcard(project.queue) == 0 and not r.exists("arq:job:evil")
    assert "deserializing job evil failed" in worker.stderr


def test_finished_runs_leave_no_key_without_ttl(project, redis_url):
    project.start_worker()
    for bp in ("chain", "routed", "wide"):
        assert project.cli_json("enqueue", bp, "--wait", "--timeout", "60")["status"] == "completed"
    r = redis_lib.Redis.from_url(redis_url)
    run_keys = [k for k in r.scan_iter("*") if k.startswith((b"workflow:", b"flowcraft:"))]
    assert run_keys
    no_ttl = [k for k in run_keys if r.ttl(k) < 0]
    assert no_ttl == []


def _slow_calls(project, what):
    return sum(1 for c in project.calls() if c.startswith(f"slow {what}"))


def test_sigterm_lets_the_running_step_finish(project):
    w0 = project.start_worker()
    run_id = project.cli("enqueue", "chain", check=True).stdout.strip()
    wait_for(lambda: _slow_calls(project, "start") == 1, 30, "the slow node to start")
    w0.send_signal(signal.SIGTERM)
    assert w0.wait(timeout=30) == 0
    assert _slow_calls(project, "end") == 1  # it finished its step before exiting
    project.start_worker()
    view = wait_for(lambda: (v := project.cli_json("inspect", run_id))["status"] == "completed" and v, 60, "completion")
    assert _slow_calls(project, "start") == 1
    assert view["outputs"]["join"] == ["side", "slow"]


def test_sigterm_hands_back_a_step_it_cannot_finish(tmp_path, redis_url):
    redis_lib.Redis.from_url(redis_url).flushdb()
    project = Project(tmp_path, redis_url, shutdown_wait=0.2)
    try:
        w0 = project.start_worker()
        run_id = project.cli("enqueue", "chain", check=True).stdout.strip()
        wait_for(lambda: _slow_calls(project, "start") == 1, 30, "the slow node to start")
        w0.send_signal(signal.SIGTERM)
        assert w0.wait(timeout=30) == 0
        assert _slow_calls(project, "end") == 0  # cut short and handed back, not lost
        view = project.cli_json("inspect", run_id)
        assert {n["node_id"]: n["status"] for n in view["nodes"]}["slow"] == "queued"
        project.start_worker()
        view = wait_for(lambda: (v := project.cli_json("inspect", run_id))["status"] == "completed" and v, 60,
                        "completion on the second worker")
        assert _slow_calls(project, "start") == 2 and _slow_calls(project, "end") == 1
        assert sum(1 for c in project.calls() if c.startswith("join run")) == 1
    finally:
        project.stop_all()


def test_cancel_marks_unfinished_nodes_and_resume_checks_the_action(project):
    project.start_worker()
    run_id = project.cli("enqueue", "chain", check=True).stdout.strip()
    wait_for(lambda: _slow_calls(project, "start") == 1, 30, "the slow node to start")
    assert project.cli("cancel", run_id).returncode == 0
    view = project.cli_json("inspect", run_id)
    assert view["status"] == "cancelled"
    slow = next(n for n in view["nodes"] if n["node_id"] == "slow")
    assert slow["status"] == "cancelled" and "cancelled" in slow["error"]
    assert [a["outcome"] for a in slow["attempts_history"]] == ["cancelled"]
    wait_for(lambda: _slow_calls(project, "end") == 1, 30, "the slow step to end")
    assert project.cli_json("inspect", run_id)["outputs"].get("join") is None  # nothing ran after the cancel
    again = project.cli("cancel", run_id)  # a request that conflicts with the run's state: exit 1, one line
    assert again.returncode == 1 and again.stderr == f"error: run '{run_id}' is cancelled; nothing to cancel\n"
    late = project.cli("resume", run_id, "--action", "go")
    assert late.returncode == 1 and late.stderr == f"error: run '{run_id}' is cancelled, not awaiting a resume\n"


def test_resume_refuses_an_action_no_edge_takes(tmp_path, redis_url):
    redis_lib.Redis.from_url(redis_url).flushdb()
    project = Project(tmp_path, redis_url, extra_blueprints={"review": textwrap.dedent("""
        nodes:
          - {id: w, uses: wait}
          - {id: approved, uses: noop}
          - {id: declined, uses: noop}
        edges:
          - {source: w, target: approved, action: approve}
          - {source: w, target: declined, action: reject}
    """)})
    try:
        project.start_worker()
        run_id = project.cli("enqueue", "review", check=True).stdout.strip()
        project.wait_run(run_id, statuses=("awaiting",))
        typo = project.cli("resume", run_id, "--action", "aprove")
        assert typo.returncode == 2 and "did you mean 'approve'" in typo.stderr
        other = project.cli("resume", run_id, "--node", "approved", "--action", "approve")
        assert other.returncode == 1, other.stderr
        assert other.stderr == f"error: node 'approved' of run '{run_id}' is not awaiting (awaiting: w)\n"
        unknown = project.cli("resume", run_id, "--node", "nope", "--action", "approve")
        assert unknown.returncode == 2 and "has no node 'nope'" in unknown.stderr
        assert project.cli("resume", run_id, "--action", "approve", "--output", '{"by": "me"}').returncode == 0
        view = project.wait_run(run_id)
        assert view["status"] == "completed"
        assert {n["node_id"]: n["status"] for n in view["nodes"]} == {"w": "completed", "approved": "completed", "declined": "skipped"}
        again = project.cli("resume", run_id, "--action", "approve")
        assert again.returncode == 1 and again.stderr == f"error: run '{run_id}' is completed, not awaiting a resume\n"
        done = project.cli("cancel", run_id)
        assert done.returncode == 1 and done.stderr == f"error: run '{run_id}' is completed; nothing to cancel\n"
    finally:
        project.stop_all()


def test_random_dags_across_two_worker_processes(project):
    import json as _json

    from tests.test_random_dags import make_dag

    dags = [make_dag(seed) for seed in range(100, 106)]
    for bp, _, _ in dags:
        (project.root / "blueprints" / f"{bp['id']}.json").write_text(_json.dumps(bp))
    project.start_worker()
    project.start_worker()
    runs = [(project.cli("enqueue", bp["id"], check=True).stdout.strip(), expected) for bp, _, expected in dags]
    for run_id, expected in runs:
        view = project.wait_run(run_id, timeout=60)
        assert view["status"] == "completed", view["reason"]
        assert {n["node_id"]: n["status"] for n in view["nodes"]} == expected


def test_inspect_shows_undecodable_values(project, redis_url):
    project.start_worker()
    run_id = project.cli("enqueue", "routed", check=True).stdout.strip()
    assert project.wait_run(run_id)["status"] == "completed"
    r = redis_lib.Redis.from_url(redis_url)
    r.hset(f"workflow:state:{run_id}", mapping={"bytes": b"\xff\xfe", "text": b"{not json",
                                                "pickled": pickle.dumps({"x": 1})})
    r.hset(f"flowcraft:run:{run_id}", "n:b", b"\x80garbage")
    view = project.cli_json("inspect", run_id)
    assert view["context"]["bytes"] == "<undecodable: 2 bytes>"
    assert view["context"]["text"] == "<undecodable: 9 bytes>"
    assert view["context"]["pickled"].startswith("<undecodable: ")  # never unpickled
    b = next(n for n in view["nodes"] if n["node_id"] == "b")
    assert b["status"] == "?" and b["error"] == "<undecodable: 8 bytes>"
    human = project.cli("inspect", run_id)
    assert human.returncode == 0 and "Traceback" not in human.stderr, human.stderr
    assert "<undecodable: 2 bytes>" in human.stdout and "<undecodable: 9 bytes>" in human.stdout
