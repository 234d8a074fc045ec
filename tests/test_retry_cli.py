"""`flowcraft retry` (CONTRACT §10) through the real CLI and a real worker process."""

from __future__ import annotations

import redis as redis_lib

from tests.e2e import Project

FLAKY = '''

@node("flaky-file")
def flaky_file(ctx):
    _log(ctx, "run")
    deadline = time.monotonic() + 30
    while ctx.context.get("_outputs.side") is None and time.monotonic() < deadline:
        time.sleep(0.02)  # fail only once the parallel branch has arrived at the join (a deterministic test)
    if Path(ctx.params["broken"]).exists():
        raise RuntimeError("the database is down")
    return "fixed"
'''

BLUEPRINT = """
nodes:
  - {id: start, uses: noop, params: {log: "LOG"}}
  - {id: flaky, uses: flaky-file, params: {log: "LOG", broken: "BROKEN"}}
  - {id: side, uses: noop, params: {log: "LOG"}}
  - {id: join, uses: join, params: {log: "LOG"}}
edges:
  - {source: start, target: flaky}
  - {source: start, target: side}
  - {source: flaky, target: join}
  - {source: side, target: join}
"""


def _runs(project: Project) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in project.calls():
        node, what, _ = line.split()
        if what == "run":
            counts[node] = counts.get(node, 0) + 1
    return counts


def test_retry_resumes_a_failed_run_from_the_failed_node(tmp_path, redis_url):
    redis_lib.Redis.from_url(redis_url).flushdb()
    project = Project(tmp_path, redis_url)
    broken = tmp_path / "broken"
    broken.write_text("")
    (tmp_path / "e2e_nodes.py").write_text((tmp_path / "e2e_nodes.py").read_text() + FLAKY)
    (tmp_path / "blueprints" / "flaky.yaml").write_text(
        BLUEPRINT.replace("LOG", str(project.log)).replace("BROKEN", str(broken)))
    try:
        project.start_worker()
        first = project.cli_json("enqueue", "flaky", "--wait", "--timeout", "60")
        assert first["status"] == "failed"
        assert _runs(project) == {"start": 1, "flaky": 1, "side": 1}
        run_id = first["run_id"]

        broken.unlink()
        retried = project.cli_json("retry", run_id)
        assert retried["queued"] == ["flaky"]
        view = project.wait_run(run_id)
        assert view["status"] == "completed"
        assert view["outputs"]["join"] == ["flaky", "side"]
        assert _runs(project) == {"start": 1, "flaky": 2, "side": 1, "join": 1}

        again = project.cli("retry", run_id)
        assert again.returncode == 1
        assert again.stderr.strip().splitlines()[-1] == \
            f"error: run '{run_id}' is completed; only a failed run can be retried"
        missing = project.cli("retry", "no-such-run")
        assert missing.returncode == 1 and "not found" in missing.stderr
    finally:
        project.stop_all()
