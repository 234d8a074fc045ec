"""Heartbeat leases (CONTRACT §6.1): a killed worker's step is recovered about ``lease_seconds`` after its
last heartbeat, whatever ``job_timeout_seconds`` is; a worker that comes back after its lease lapsed is
fenced off; no attempt is cut short by anything but its own limit. Real worker processes, real Redis."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import redis as redis_lib

from tests.e2e import Project, slow_fan_yaml, wait_for

SLOW_CHAIN = """
nodes:
  - {id: start, uses: noop, params: {log: "LOG"}}
  - {id: slow, uses: slow, params: {seconds: SECONDS, log: "LOG"}}
  - {id: end, uses: noop, params: {log: "LOG"}}
edges:
  - {source: start, target: slow}
  - {source: slow, target: end}
"""

KILLER = """
nodes:
  - {id: start, uses: noop}
  - {id: boom, uses: suicide, config: {maxRetries: 2}, params: {log: "LOG"}}
edges:
  - {source: start, target: boom}
"""

SUICIDE = '''

@node("suicide")
async def suicide(ctx):
    _log(ctx, "start")
    os.kill(os.getpid(), 9)

@node("suicide_once")
async def suicide_once(ctx):
    _log(ctx, "start")
    marker = Path(ctx.params["log"] + ".killed")
    if not marker.exists():
        marker.write_text("once")
        os.kill(os.getpid(), 9)
    return "survived"
'''

KILL_ONCE = """
nodes:
  - {id: start, uses: noop, params: {log: "LOG"}}
  - {id: slow, uses: slow, params: {seconds: 0.2, log: "LOG"}}
  - {id: boom, uses: suicide_once, params: {log: "LOG"}}
  - {id: end, uses: noop, params: {log: "LOG"}}
edges:
  - {source: start, target: slow}
  - {source: slow, target: boom}
  - {source: boom, target: end}
"""


def _count(project: Project, prefix: str) -> int:
    return sum(1 for line in project.calls() if line.startswith(prefix))


def _pids(project: Project, prefix: str) -> list[str]:
    return [line.split()[-1] for line in project.calls() if line.startswith(prefix)]


def _project(tmp_path, redis_url, *, seconds: float = 3, **kw) -> Project:
    redis_lib.Redis.from_url(redis_url).flushdb()
    p = Project(tmp_path, redis_url, **kw)
    text = SLOW_CHAIN.replace("LOG", str(p.log)).replace("SECONDS", str(seconds))
    (tmp_path / "blueprints" / "slow-chain.yaml").write_text(text)
    return p


def _slow_started(project: Project, run_id: str) -> None:
    """Until the slow node runs and its claim is in: it may start ahead of its predecessor's commit, which
    claims it for its worker AHEAD_S later (engine.ahead), and only then is a death of its worker its own."""
    wait_for(lambda: _count(project, "slow start") >= 1, 30, "the slow node to start")
    wait_for(lambda: next(n for n in project.cli_json("inspect", run_id)["nodes"]
                          if n["node_id"] == "slow")["status"] == "running", 30, "the slow node's claim")


def _lost(view: dict) -> list[dict]:
    return [e for e in view["timeline"] if e["outcome"] == "lost"]


@pytest.fixture
def stop(request):
    projects: list[Project] = []
    yield projects.append
    for p in projects:
        p.stop_all()


def test_sigkilled_worker_is_recovered_within_its_lease(tmp_path, redis_url, stop):
    # job_timeout_seconds is 300: before heartbeat leases, recovery waited for arq's lock (310 s)
    project = _project(tmp_path, redis_url, lease=3, job_timeout=300)
    stop(project)
    w0 = project.start_worker()
    run_id = project.cli("enqueue", "slow-chain", check=True).stdout.strip()
    _slow_started(project, run_id)
    dead_pid = _pids(project, "slow start")[0]
    w0.send_signal(signal.SIGKILL)
    w0.wait()
    view = project.cli_json("inspect", run_id)
    slow = next(n for n in view["nodes"] if n["node_id"] == "slow")
    assert slow["status"] == "running"

    def shown_lost():
        node = next(n for n in project.cli_json("inspect", run_id)["nodes"] if n["node_id"] == "slow")
        return node["status"] == "running" and node.get("detail", "").startswith("worker lost") and node

    wait_for(shown_lost, 30, "inspect to show the node's worker as lost", interval=0.3)
    table = project.cli("inspect", run_id).stdout
    assert "running (worker lost" in table
    project.start_worker()  # no reconciler runs in this test
    view = project.wait_run(run_id, timeout=30)
    assert view["status"] == "completed"
    assert _count(project, "slow end") == 1 and _count(project, "end run") == 1
    lost = _lost(view)
    assert len(lost) == 1 and lost[0]["node_id"] == "slow" and f":{dead_pid}:" in lost[0]["worker"]
    slow = next(n for n in view["nodes"] if n["node_id"] == "slow")
    assert slow["attempts"] == 1  # a lost attempt does not count against maxRetries


def test_a_step_claimed_inline_is_recovered_like_a_queued_one(tmp_path, redis_url, stop):
    """`start`'s commit claims `slow` for its own worker, which runs it next without a queue job (inline). A
    SIGKILL there is recovered from the worker's list of steps, as for a queued step: one lost attempt, and
    the run completes on another worker."""
    project = _project(tmp_path, redis_url, lease=3, job_timeout=300)
    stop(project)
    w0 = project.start_worker()
    run_id = project.cli("enqueue", "slow-chain", check=True).stdout.strip()
    _slow_started(project, run_id)
    # slow has no job of its own, and start's left the queue when its commit handed the slot to slow: the
    # queue is empty while slow runs, listed under start's job id
    counts = project.cli_json("queue")
    assert (counts["ready"], counts["deferred"], counts["in_progress"]) == (0, 0, 0), counts
    assert _pids(project, "slow start") == _pids(project, "start run")  # one worker ran both
    r = redis_lib.Redis.from_url(redis_url)
    [steps_key] = list(r.scan_iter("flowcraft:worker-steps:*"))
    # listed under start's job, the entry as start's claim wrote it: slow's claim names it (no rewrite a step)
    listed = {k.decode(): json.loads(v)["node_id"] for k, v in r.hgetall(steps_key).items()}
    assert list(listed.values()) == ["start"] and "|start|" in next(iter(listed))
    r.close()
    w0.send_signal(signal.SIGKILL)
    w0.wait()
    project.start_worker()
    view = project.wait_run(run_id, timeout=30)
    assert view["status"] == "completed"
    assert _count(project, "start run") == 1 and _count(project, "slow end") == 1 and _count(project, "end run") == 1
    lost = _lost(view)
    assert len(lost) == 1 and lost[0]["node_id"] == "slow"


def test_default_lease_recovers_in_about_fifteen_seconds(tmp_path, redis_url, stop):
    project = _project(tmp_path, redis_url, job_timeout=300)
    stop(project)
    w0 = project.start_worker()
    run_id = project.cli("enqueue", "slow-chain", check=True).stdout.strip()
    _slow_started(project, run_id)
    w0.send_signal(signal.SIGKILL)
    w0.wait()
    project.start_worker()
    # lease 15 s + the slow node's 3 s + slack for a busy machine; arq's own lock would take 310 s
    view = project.wait_run(run_id, timeout=45)
    assert view["status"] == "completed"
    assert len(_lost(view)) == 1


def test_worker_paused_past_its_lease_is_fenced_off(tmp_path, redis_url, stop):
    project = _project(tmp_path, redis_url, lease=2, job_timeout=300, seconds=4)
    stop(project)
    w0 = project.start_worker()
    run_id = project.cli("enqueue", "slow-chain", check=True).stdout.strip()
    _slow_started(project, run_id)
    w0.send_signal(signal.SIGSTOP)  # a long GC pause, a partition: no heartbeats, but not dead
    try:
        w1 = project.start_worker()
        wait_for(lambda: _count(project, "slow start") == 2, 30, "the step to be recovered on the second worker")
        assert _pids(project, "slow start")[1] == str(w1.pid)
    finally:
        w0.send_signal(signal.SIGCONT)
    view = project.wait_run(run_id, timeout=60)
    assert view["status"] == "completed"
    wait_for(lambda: _count(project, "slow end") == 2, 30, "the paused worker to finish its stale attempt")
    wait_for(lambda: "fenced off" in project.worker_log(0), 30, "the paused worker to log that it was fenced off")
    stored = redis_lib.Redis.from_url(redis_url).hgetall(f"flowcraft:run:{run_id}")  # events: fields e:<n>
    events = [json.loads(v) for _, v in sorted((int(k[2:]), v) for k, v in stored.items() if k.startswith(b"e:"))]
    assert [e["worker"] for e in events if e["type"] == "node_completed" and e["node"] == "slow"] == \
        [next(n for n in view["nodes"] if n["node_id"] == "slow")["worker"]]
    assert _count(project, "end run") == 1
    assert f":{w1.pid}:" in next(n for n in view["nodes"] if n["node_id"] == "slow")["worker"]


def test_attempt_is_not_cut_short_by_a_hidden_cap(tmp_path, redis_url, stop):
    # job_timeout_seconds 5 and a 4-second node: the engine used to cap every attempt at job_timeout - 2
    project = _project(tmp_path, redis_url, lease=3, job_timeout=5, seconds=4)
    stop(project)
    project.start_worker()
    result = project.cli_json("enqueue", "slow-chain", "--wait", "--timeout", "60")
    assert result["status"] == "completed", result["reason"]


KILLER_START = """
nodes:
  - {id: boom, uses: suicide, config: {maxRetries: 2}, params: {log: "LOG"}}
edges: []
"""


def _run_killer(project: Project, blueprint: str) -> dict:
    """Enqueue ``blueprint`` and start a worker each time the last one died, until the run ends."""
    run_id = project.cli("enqueue", blueprint, check=True).stdout.strip()

    def finished_or_restart() -> bool:
        if project.cli_json("inspect", run_id)["status"] in ("completed", "failed"):
            return True
        if all(w.poll() is not None for w in project.workers):
            # not start_worker(): this one may well die before it is seen alive
            project.workers.append(subprocess.Popen([sys.executable, "-m", "flowcraft_cli", "worker", "start"],
                                                    cwd=project.root, env=project.env(),
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return False

    wait_for(finished_or_restart, 90, "the run to end", interval=0.5)
    return project.cli_json("inspect", run_id)


def _killer_project(tmp_path, redis_url, stop) -> Project:
    redis_lib.Redis.from_url(redis_url).flushdb()
    project = Project(tmp_path, redis_url, lease=1.5, job_timeout=300)
    stop(project)
    (project.root / "e2e_nodes.py").write_text((project.root / "e2e_nodes.py").read_text() + SUICIDE)
    for name, doc in (("killer", KILLER), ("killer-start", KILLER_START), ("kill-once", KILL_ONCE)):
        (project.root / "blueprints" / f"{name}.yaml").write_text(doc.replace("LOG", str(project.log)))
    return project


def test_node_that_kills_its_worker_every_time_ends_failed(tmp_path, redis_url, stop):
    """boom first runs ahead of start's commit (engine.ahead), unclaimed: that death is charged to start's job,
    which is delivered again and then runs nothing ahead; boom, claimed by its commit, then runs inline and is
    lost twice. Start's one lost attempt is recorded only if it was claimed when boom killed the worker (it
    ran past the late claim delay)."""
    project = _killer_project(tmp_path, redis_url, stop)
    view = _run_killer(project, "killer")
    assert view["status"] == "failed"
    assert "lost" in view["reason"] and "boom" in view["reason"]
    assert _count(project, "boom start") == 3
    assert [e["node_id"] for e in _lost(view)] in (["boom", "boom"], ["start", "boom", "boom"])


def test_start_node_that_kills_its_worker_every_time_ends_failed(tmp_path, redis_url, stop):
    """A start job's first delivery runs its node before claiming it (Engine.defer_claims): a death within
    LATE_CLAIM_S of the start is not an attempt of record. The job's next delivery claims first, so the node
    still ends after maxRetries lost attempts: one run of it more, at most."""
    project = _killer_project(tmp_path, redis_url, stop)
    view = _run_killer(project, "killer-start")
    assert view["status"] == "failed"
    assert "lost" in view["reason"]
    assert [e["node_id"] for e in _lost(view)] == ["boom", "boom"]
    assert _count(project, "boom start") in (2, 3)  # 3 unless the first run outlived the late claim delay


def test_a_worker_killed_by_a_node_run_ahead_is_charged_to_the_groups_first_node(tmp_path, redis_url, stop):
    """slow, claimed by start's commit while it ran ahead, finishes and runs boom ahead of its own commit; boom
    kills the worker, once. Nothing of slow's group was committed: slow (held, listed) is recovered with one
    lost attempt, runs again claimed and runs nothing ahead; boom then runs claimed, and the run completes.
    Nothing after boom ran before the death, and nothing runs twice to its end but slow."""
    project = _killer_project(tmp_path, redis_url, stop)
    view = _run_killer(project, "kill-once")
    assert view["status"] == "completed", view["reason"]
    assert [e["node_id"] for e in _lost(view)] == ["slow"]
    assert (_count(project, "start run"), _count(project, "slow end"), _count(project, "boom start"),
            _count(project, "end run")) == (1, 2, 2, 1)
    assert view["outputs"]["end"] == "end" and view["context"]["_outputs.boom"] == "survived"


def test_worker_killed_before_listing_its_step_is_covered_by_arqs_lease(tmp_path, redis_url, stop):
    """The worker dies after arq handed it the job and before it listed the step: no heartbeat can see the
    step, but arq's lock on the job is one lease long, so arq hands it to another worker itself."""
    project = _project(tmp_path, redis_url, lease=2, job_timeout=300, seconds=0.1)
    stop(project)
    w0 = project.start_worker(env={"FLOWCRAFT_FAILPOINT": "before-hold:start"})  # slow would run inline
    run_id = project.cli("enqueue", "slow-chain", check=True).stdout.strip()
    assert w0.wait(timeout=60) == 137
    project.start_worker()
    view = project.wait_run(run_id, timeout=30)  # before: arq's lock lasted job_timeout + 10 s (310 s)
    assert view["status"] == "completed"
    assert _count(project, "slow end") == 1 and _count(project, "start run") == 1


def test_a_fan_out_whose_worker_dies_while_its_slots_run_claimed_branches_completes(tmp_path, redis_url, stop):
    """20 one-second branches on 8 slots: the first wave comes from the queue (arq), then each slot's commit
    claims a queued sibling and drops its job, and a job leaves the queue once its step hands the slot on.
    SIGKILL mid-fan: the steps the dead worker held are listed under it, not queued; another worker (no
    reconciler) recovers them a lease later and runs what is still queued. Every branch ends exactly once."""
    project = _project(tmp_path, redis_url, lease=3, job_timeout=300)
    stop(project)
    branches = [f"b{i:02d}" for i in range(20)]
    (tmp_path / "blueprints" / "slow-fan.yaml").write_text(slow_fan_yaml(project.log, branches))
    w0 = project.start_worker()
    run_id = project.cli("enqueue", "slow-fan", check=True).stdout.strip()
    # past the first wave (8 slots): later branches were claimed by the slots' own commits
    wait_for(lambda: sum(1 for c in project.calls() if c.split()[1:2] == ["start"]) >= 11, 60, "a second wave")
    w0.send_signal(signal.SIGKILL)
    w0.wait()
    project.start_worker()
    view = project.wait_run(run_id, timeout=60)
    assert view["status"] == "completed", view.get("reason")
    ends = [c.split()[0] for c in project.calls() if c.split()[1:2] == ["end"]]
    lost = _lost(view)
    assert lost and all(e["node_id"] in branches for e in lost)  # the dead worker's steps, recovered
    assert set(ends) == set(branches)  # none left behind
    # none run twice to its end, unless the kill fell between its end and its commit (then it was lost)
    assert len(ends) <= len(branches) + len(lost)
    assert sum(1 for c in project.calls() if c.startswith("join run")) == 1


def test_two_workers_and_a_sweeping_reconciler_through_a_fan_out_and_a_sigkill(tmp_path, redis_url, stop):
    """Two workers share a 20-branch fan-out (their slots claim queued siblings, jobs leave the queue as slots
    go on), a reconciler sweeps every 0.2 s with threshold 0 (so it judges the healthy run over and over), and
    one worker is SIGKILLed mid-fan. Nothing runs twice to its end except a step the dead worker held, nothing
    is left behind, and the join runs once."""
    project = _project(tmp_path, redis_url, lease=3, job_timeout=300)
    stop(project)
    branches = [f"b{i:02d}" for i in range(20)]
    (tmp_path / "blueprints" / "slow-fan.yaml").write_text(slow_fan_yaml(project.log, branches, seconds=0.5))
    w0 = project.start_worker()
    project.start_worker()
    sweeper = subprocess.Popen([sys.executable, "-m", "flowcraft_cli", "reconcile", "--threshold", "0",
                                "--interval", "0.2", "--json"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        run_id = project.cli("enqueue", "slow-fan", check=True).stdout.strip()
        wait_for(lambda: sum(1 for c in project.calls() if c.split()[1:2] == ["start"]) >= 11, 60, "a second wave")
        w0.send_signal(signal.SIGKILL)
        w0.wait()
        view = project.wait_run(run_id, timeout=60)
    finally:
        sweeper.terminate()
        _, err = sweeper.communicate(timeout=30)
    assert sweeper.returncode == 0, err
    assert view["status"] == "completed", view.get("reason")
    ends = [c.split()[0] for c in project.calls() if c.split()[1:2] == ["end"]]
    assert set(ends) == set(branches)
    assert len(ends) <= len(branches) + len(_lost(view))  # a second end only for a step the dead worker held
    assert sum(1 for c in project.calls() if c.startswith("join run")) == 1
