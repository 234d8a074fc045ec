"""Views need only Redis (CONTRACT §10): `inspect`, `cancel`, `runs` and `reconcile` from an empty directory
with nothing but FLOWCRAFT_REDIS_URL and FLOWCRAFT_QUEUE; the run index behind `flowcraft runs` (filters,
table and JSON) and its entries expiring with their runs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from flowcraft_cli.distributed import keys
from flowcraft_cli.distributed.adapter import ArqAdapter
from tests.e2e import Project, wait_for
from tests.harness import idle_s, make_blueprints, make_registry

WAITS = "nodes: [{id: w, uses: wait}]\nedges: []\n"


def bare_cli(cwd: Path, redis_url: str, queue: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in ``cwd`` with only the two variables set: no flowcraft.yaml, no blueprints, no nodes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCRAFT_")}
    env.update({"FLOWCRAFT_REDIS_URL": redis_url, "FLOWCRAFT_QUEUE": queue})
    return subprocess.run([sys.executable, "-m", "flowcraft_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_inspect_cancel_runs_from_an_empty_directory(tmp_path, empty, redis_url, redis_sync):
    project = Project(tmp_path / "a", redis_url, extra_blueprints={"waits": WAITS})
    try:
        project.start_worker()
        done = project.cli_json("enqueue", "routed", "--wait")["run_id"]
        waiting = project.cli("enqueue", "waits", check=True).stdout.strip()
        project.wait_run(waiting, statuses=("awaiting",))
    finally:
        project.stop_all()
    assert not list(empty.iterdir())

    doc = json.loads(bare_cli(empty, redis_url, project.queue, "inspect", done, "--json").stdout)
    assert doc["status"] == "completed"
    assert [(n["node_id"], n["status"]) for n in doc["nodes"]] == [("a", "completed"), ("b", "completed"),
                                                                   ("c", "skipped")]  # blueprint order
    table = bare_cli(empty, redis_url, project.queue, "inspect", done)
    assert table.returncode == 0, table.stderr
    assert "decide" in table.stdout and table.stdout.index(" a ") < table.stdout.index(" c ")

    cancel = bare_cli(empty, redis_url, project.queue, "cancel", waiting)
    assert cancel.returncode == 0, cancel.stderr
    assert json.loads(bare_cli(empty, redis_url, project.queue, "inspect", waiting, "--json").stdout)["status"] \
        == "cancelled"

    listed = json.loads(bare_cli(empty, redis_url, project.queue, "runs", "--json").stdout)
    assert [(r["run_id"], r["blueprint_id"], r["status"]) for r in listed["runs"]] == [
        (waiting, "waits", "cancelled"), (done, "routed", "completed")]
    assert not list(empty.iterdir())  # nothing written to the working directory either


def test_reconcile_from_an_empty_directory_judges_its_queue_and_skips_another(tmp_path, empty, redis_url,
                                                                              redis_sync):
    mine = Project(tmp_path / "a", redis_url)
    theirs = Project(tmp_path / "b", redis_url)
    lost = mine.cli("enqueue", "routed", check=True).stdout.strip()
    foreign = theirs.cli("enqueue", "routed", check=True).stdout.strip()
    for project in (mine, theirs):  # no worker ever took them: make both start jobs vanish from arq
        for job_id in redis_sync.zrange(project.queue, 0, -1):
            redis_sync.delete(b"arq:job:" + job_id)
        redis_sync.delete(project.queue)
    wait_for(lambda: all(idle_s(redis_sync, r) >= 1 for r in (lost, foreign)), 10, "the runs to be idle")

    r = bare_cli(empty, redis_url, mine.queue, "reconcile", "--threshold", "0", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    runs = {run["run_id"]: run for run in doc["runs"]}
    assert doc["failed_runs"] == 0 and doc["reconciled_runs"] == 1 and doc["stalled_runs"] == 1
    assert runs[lost]["enqueued"] == 1 and runs[lost]["skipped"] is None
    assert runs[foreign]["skipped"] == f"a run of queue {theirs.queue!r}" and runs[foreign]["enqueued"] == 0
    assert redis_sync.zcard(mine.queue) == 1 and redis_sync.zcard(theirs.queue) == 0  # nothing on their queue

    table = bare_cli(empty, redis_url, mine.queue, "reconcile", "--threshold", "0", "--dry-run")
    assert table.returncode == 0 and "skipped: a run of queue" in table.stdout


NODES = {"ok": lambda ctx: ctx.node_id, "boom": lambda ctx: 1 / 0}
BLUEPRINTS = ["id: good\nnodes: [{id: x, uses: ok}]\nedges: []\n",
              "id: bad\nnodes: [{id: first, uses: ok}, {id: breaks, uses: boom}]\nedges: [{source: first, target: breaks}]\n",
              "id: waits\n" + WAITS]


class Runs:
    """An in-process adapter (worker and client) that makes runs of known outcome."""

    def __init__(self, url: str, queue: str, *, ttl_s: int = 600) -> None:
        self.loop = asyncio.new_event_loop()
        self.queue = queue
        registry = make_registry(NODES)
        bps = make_blueprints(BLUEPRINTS, registry)

        async def make() -> ArqAdapter:
            return ArqAdapter(connection=Redis.from_url(url), queue_name=queue, ttl_s=ttl_s,
                              runtime_options={"registry": registry, "blueprints": bps})

        self.adapter = self.loop.run_until_complete(make())

    def make(self, blueprint_id: str, n: int = 1) -> list[str]:
        ids = []
        for _ in range(n):
            # runs are ordered by their start time in ms; two in one ms would tie (Redis then orders by id)
            ms = int(time.time() * 1000)
            while int(time.time() * 1000) == ms:
                time.sleep(0.0005)
            ids.append(self.loop.run_until_complete(self.adapter.start_run(blueprint_id, {})))
        self.loop.run_until_complete(self.adapter.start(burst=True))
        return ids

    def close(self) -> None:
        self.loop.run_until_complete(self.adapter.close())
        self.loop.run_until_complete(self.adapter.redis.aclose())
        self.loop.close()


@pytest.fixture
def runs(redis_url, redis_sync):
    r = Runs(redis_url, "runs-queue")
    yield r
    r.close()


def test_runs_filters_table_and_json(runs, empty, redis_url, redis_sync):
    good = runs.make("good", 3)
    bad = runs.make("bad")
    waiting = runs.make("waits")
    old = runs.make("good")[0]
    # started two hours ago, as far as the index and the run's meta are concerned
    two_hours_ago = int(time.time() * 1000) - 2 * 3600 * 1000
    redis_sync.hset(keys.kind_key("run", old), "created_at", two_hours_ago)
    redis_sync.zadd(keys.runs_by_status_key("completed", runs.queue), {old: two_hours_ago})

    def listed(*args: str) -> list[dict]:
        r = bare_cli(empty, redis_url, runs.queue, "runs", *args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["runs"]

    everything = listed()
    assert [r["run_id"] for r in everything] == [*waiting, *bad, *reversed(good), old]  # newest first
    assert [r["run_id"] for r in listed("--status", "completed")] == [*reversed(good), old]
    failed = listed("--status", "failed")
    assert [(r["run_id"], r["failed_node"], r["status"]) for r in failed] == [(bad[0], "breaks", "failed")]
    assert failed[0]["duration_ms"] >= 0 and failed[0]["started_at"].endswith("Z") and failed[0]["finished_at"]
    assert [r["run_id"] for r in listed("--status", "awaiting")] == waiting
    assert listed("--status", "running") == []
    assert [r["run_id"] for r in listed("--blueprint", "good")] == [*reversed(good), old]
    assert [r["run_id"] for r in listed("--since", "1h")] == [*waiting, *bad, *reversed(good)]
    assert [r["run_id"] for r in listed("--limit", "2")] == [*waiting, *bad]
    assert [r["run_id"] for r in listed("--blueprint", "good", "--since", "1h", "--limit", "2")] == list(reversed(good))[:2]

    table = bare_cli(empty, redis_url, runs.queue, "runs", "--status", "failed")
    assert table.returncode == 0, table.stderr
    assert bad[0] in table.stdout and "breaks" in table.stdout and "failed node" in table.stdout
    assert good[0] not in table.stdout
    for bad_args in (("--status", "exploded"), ("--since", "soon"), ("--limit", "0")):
        r = bare_cli(empty, redis_url, runs.queue, "runs", *bad_args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_index_entries_expire_with_their_runs(redis_url, redis_sync, empty):
    short = Runs(redis_url, "expiring-queue", ttl_s=1)
    try:
        first = short.make("good")[0]
        index = keys.run_index_keys(short.queue)
        assert redis_sync.zscore(keys.runs_expiry_key(short.queue), first) is not None
        assert redis_sync.zscore(keys.runs_by_status_key("completed", short.queue), first) is not None
        definition = redis_sync.keys("flowcraft:blueprint:good:*")
        assert len(definition) == 1 and redis_sync.get(definition[0])
        # the definition outlives the run that recorded it (running TTL at start; never shortened)
        assert redis_sync.pttl(definition[0]) > redis_sync.pttl(keys.kind_key("run", first))
        wait_for(lambda: not redis_sync.exists(keys.kind_key("run", first)), 15, "the run's keys to expire")
        # gone from the run's keys, not yet from the index: `runs` skips it
        r = bare_cli(empty, redis_url, short.queue, "runs", "--json")
        assert json.loads(r.stdout)["runs"] == []
        second = short.make("good")[0]  # the next index write drops the expired entry everywhere
        assert all(redis_sync.zscore(k, first) is None for k in index)
        assert redis_sync.zscore(keys.runs_by_status_key("completed", short.queue), second) is not None
    finally:
        short.close()


def test_the_run_list_misses_no_run_when_others_leave_its_group_while_it_is_read(redis_url, redis_sync):
    """The list merges the status groups page by page. Runs that finish while it is read leave the active group
    (and join the completed one): the runs after them in the active group are still listed, each once, newest
    first; those that moved are met once too."""
    from flowcraft_cli.distributed.views import _Newest

    queue = "paging-queue"
    active, done = keys.runs_by_status_key("active", queue), keys.runs_by_status_key("completed", queue)
    runs = [f"r{i:03d}" for i in range(60)]  # r059 newest
    redis_sync.zadd(active, {r: 1000 + i for i, r in enumerate(runs)} | {keys.GROUP_PLACEHOLDER: float("-inf")})

    async def go():
        r = Redis.from_url(redis_url)
        newest = _Newest(r, [keys.runs_by_status_key(g, queue) for g in keys.RUN_GROUPS], "-inf")
        first = await newest.take(50)
        for run_id in runs[50:60]:  # ten of the listed ones finish
            await r.zrem(active, run_id)
            await r.zadd(done, {run_id: 1000 + runs.index(run_id)})
        rest = await newest.take(50)
        await r.aclose()
        return first, rest

    first, rest = asyncio.run(go())
    assert first == runs[::-1][:50]
    assert rest == runs[::-1][50:]
