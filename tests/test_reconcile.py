"""The reconciler (CONTRACT §7): finds stalled runs with a progress key's OBJECT IDLETIME, resumes only the
steps routing decided, never touches finished or awaiting runs, and is not blinded by reads."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest
import redis
from redis.asyncio import Redis

from flowcraft_cli.distributed.adapter import ArqAdapter
from flowcraft_cli.distributed.keys import kind_key
from flowcraft_cli.distributed.reconciler import create_arq_reconciler
from flowcraft_cli.jobs import Job
from flowcraft_cli.store import NODES as NODE_RECORDS
from tests.e2e import Project, wait_for
from tests.harness import idle_s, make_blueprints, make_registry

ROUTED = """
id: routed
nodes:
  - {id: a, uses: decide}
  - {id: b, uses: tag}
  - {id: c, uses: tag}
  - {id: w, uses: wait}
edges:
  - {source: a, target: b, action: ok}
  - {source: a, target: c, action: nope}
"""
SIMPLE = """
id: simple
nodes: [{id: x, uses: tag}, {id: y, uses: tag}]
edges: [{source: x, target: y}]
"""
FAILS = """
id: fails
nodes: [{id: f, uses: boom}]
edges: []
"""
CALLS_WAITS = """
id: calls-waits
nodes:
  - {id: call, uses: subflow, params: {blueprintId: waits}}
  - {id: after, uses: tag}
edges:
  - {source: call, target: after}
"""
WAITS = """
id: waits
nodes: [{id: w, uses: wait}]
edges: []
"""


def boom(ctx):
    raise RuntimeError("no")


NODES = {"decide": lambda ctx: __import__("flowcraft_cli").NodeResult("A", "ok"), "tag": lambda ctx: ctx.node_id,
         "boom": boom}


class Env:
    """A loop, an adapter (the worker side and the client side), and helpers to make a run stall."""

    def __init__(self, url: str, queue: str = "rec-queue") -> None:
        self.loop = asyncio.new_event_loop()
        self.url = url
        registry = make_registry(NODES)
        bps = make_blueprints([ROUTED, SIMPLE, FAILS, CALLS_WAITS, WAITS], registry)

        async def make():
            return ArqAdapter(connection=Redis.from_url(url), queue_name=queue,
                              runtime_options={"registry": registry, "blueprints": bps})

        self.adapter = self.do(make())
        self.redis_sync = redis.Redis.from_url(url)

    def do(self, coro):
        return self.loop.run_until_complete(coro)

    def start_unqueued(self, bp: str) -> str:
        """A run whose start jobs the queue lost. (A commit queues its jobs in the same atomic call, so no crash
        can leave them unqueued; arq drops a job that waited past its expiry, a day, and a Redis restarted
        without persistence loses them all.)"""
        run_id, scheduled = self.do(self.adapter.engine.start_run(bp, {}))
        self.lose([job for _, job in scheduled])
        return run_id

    def step_without_queueing(self, job: Job) -> None:
        """A step that committed, and whose successors' jobs the queue then lost."""
        self.lose([job for _, job in self.do(self.adapter.engine.handle(job)).scheduled])

    def lose(self, jobs: list[Job]) -> None:
        self.do(self.adapter.queue.discard([job.job_id for job in jobs]))

    def drain(self) -> None:
        self.do(self.adapter.start(burst=True))

    def sweep(self, threshold: float = 1, dry_run: bool = False):
        rec = create_arq_reconciler(adapter=self.adapter, redis=self.adapter.redis,
                                    stalled_threshold_seconds=threshold, dry_run=dry_run)
        return self.do(rec.run())

    def idle(self, run_id: str) -> float:
        return idle_s(self.redis_sync, run_id)

    def wait_idle(self, run_id: str, seconds: float) -> None:
        wait_for(lambda: self.idle(run_id) > seconds, 30, f"run {run_id} to be idle > {seconds}s", interval=0.2)

    def status(self, run_id: str) -> str:
        return self.do(self.adapter.inspect(run_id)).status

    def close(self) -> None:
        self.do(self.adapter.close())
        self.do(self.adapter.redis.aclose())
        self.redis_sync.close()
        self.loop.close()


@pytest.fixture
def env(redis_url, redis_sync):
    e = Env(redis_url)
    yield e
    e.close()


def test_stalled_run_is_found_and_resumed(env):
    run_id = env.start_unqueued("simple")
    env.wait_idle(run_id, 1)
    stats = env.sweep(threshold=1)
    assert stats.counts() == {"scanned_keys": 1, "stalled_runs": 1, "reconciled_runs": 1, "failed_runs": 0}
    assert stats.runs[0].run_id == run_id and stats.runs[0].nodes == ["x"]
    env.drain()
    assert env.status(run_id) == "completed"
    assert env.sweep(threshold=0).counts()["stalled_runs"] == 0  # finished: scanned, never stalled


def test_a_stall_is_found_under_an_lfu_eviction_policy(env, redis_sync):
    """Under an LFU policy Redis refuses OBJECT IDLETIME: the idle time comes from the clock the progress key
    holds (every commit writes it), or before any did, from the run's created_at."""
    redis_sync.config_set("maxmemory-policy", "allkeys-lfu")
    try:
        run_id = env.start_unqueued("simple")
        with pytest.raises(Exception, match="LFU"):
            redis_sync.object("idletime", kind_key("state", run_id))
        assert env.sweep(threshold=5).stalled_runs == 0  # just started: not idle, even without IDLETIME
        stats = wait_for(lambda: (s := env.sweep(threshold=1)).stalled_runs and s, 30, "the run to look stalled",
                         interval=0.2)
        assert stats.reconciled_runs == 1 and stats.runs[0].run_id == run_id
        assert 1 <= stats.runs[0].idle_seconds < 30
    finally:
        redis_sync.config_set("maxmemory-policy", "noeviction")
    env.drain()
    assert env.status(run_id) == "completed"


def test_reads_do_not_hide_a_stall(env):
    run_id = env.start_unqueued("simple")
    stop = threading.Event()

    def poll():
        r = redis.Redis.from_url(env.url)
        while not stop.is_set():  # what `inspect --watch` reads, every 0.2 s
            r.hgetall(f"flowcraft:run:{run_id}")
            r.hgetall(f"workflow:state:{run_id}")
            stop.wait(0.2)

    t = threading.Thread(target=poll)
    t.start()
    try:
        env.wait_idle(run_id, 2)
        # the seed's clock (the state hash's idle time, 1 s resolution) is reset by the reads: it sees no stall
        assert env.do(env.adapter.redis.object("idletime", f"workflow:state:{run_id}")) <= 1
        stats = env.sweep(threshold=2)
    finally:
        stop.set()
        t.join()
    assert stats.stalled_runs == 1 and stats.reconciled_runs == 1


def test_finished_failed_and_awaiting_runs_are_never_stalled(env):
    done = env.do(env.adapter.start_run("simple", {}))
    failed = env.do(env.adapter.start_run("fails", {}))
    awaiting_doc = ROUTED  # w is a wait node with no incoming edge: the run ends awaiting
    assert "uses: wait" in awaiting_doc
    awaiting = env.do(env.adapter.start_run("routed", {}))
    env.drain()
    assert [env.status(r) for r in (done, failed, awaiting)] == ["completed", "failed", "awaiting"]
    for r in (done, failed, awaiting):
        env.wait_idle(r, 1)
    stats = env.sweep(threshold=1)
    assert stats.counts() == {"scanned_keys": 3, "stalled_runs": 0, "reconciled_runs": 0, "failed_runs": 0}


@pytest.mark.parametrize("end", ["resume", "cancel"])
def test_a_finished_childs_note_reaches_its_awaiting_parent(env, end):
    """`resume CHILD` / `cancel CHILD` commits the child's end and queues its note to the parent in the same
    atomic call (it once waited in the child's outbox, lost if the client died before queueing it): the
    parent goes on with no sweep."""
    parent_id = env.do(env.adapter.start_run("calls-waits", {}))
    env.drain()
    assert env.status(parent_id) == "awaiting"
    child_id = env.do(env.adapter.store.read(parent_id, NODE_RECORDS, ["call"]))[0]["child"]
    if end == "resume":
        env.do(env.adapter.engine.resume(child_id, output="done"))  # the jobs it returns are not flushed
    else:
        env.do(env.adapter.engine.cancel(child_id))
    assert env.status(child_id) == ("completed" if end == "resume" else "cancelled")
    env.drain()
    parent = env.do(env.adapter.inspect(parent_id))
    if end == "resume":
        assert parent.status == "completed", parent.reason
        assert parent.outputs == {"call": "done", "after": "after"}
    else:
        assert parent.status == "failed" and "cancelled" in (parent.reason or "")
    env.wait_idle(parent_id, 0)
    assert env.sweep(threshold=0).stalled_runs == 0  # nothing pending anywhere now


def test_an_awaiting_run_with_only_leftover_outbox_entries_is_not_stalled(env, redis_sync):
    """A client queued the start jobs and died before clearing them from the outbox: the run ran on and now
    awaits. Those entries stand for steps that happened, so the sweep neither counts nor re-runs anything."""
    run_id, scheduled = env.do(env.adapter.engine.start_run("routed", {}))
    env.do(env.adapter.queue.enqueue(job for _, job in scheduled))
    # and an awaiting subflow child (its parent already told) left with its start job's entry the same way
    parent_id, parent_jobs = env.do(env.adapter.engine.start_run("calls-waits", {}))
    env.do(env.adapter.flush(parent_jobs))
    env.drain()
    child_id = env.do(env.adapter.store.read(parent_id, NODE_RECORDS, ["call"]))[0]["child"]
    child_start = Job(child_id, "w", 1)
    redis_sync.hset(f"flowcraft:outbox:{child_id}", child_start.job_id, json.dumps(child_start.to_dict()))
    assert [env.status(r) for r in (run_id, parent_id, child_id)] == ["awaiting"] * 3
    env.wait_idle(child_id, 0)
    stats = env.sweep(threshold=0)
    assert stats.counts() == {"scanned_keys": 3, "stalled_runs": 0, "reconciled_runs": 0, "failed_runs": 0}
    every_job = [job.job_id for _, job in scheduled + parent_jobs] + [child_start.job_id]
    assert env.do(env.adapter.queue.state_of(every_job)) == {}
    assert [env.status(r) for r in (run_id, parent_id, child_id)] == ["awaiting"] * 3


def test_resumes_only_the_branch_routing_took(env):
    run_id, scheduled = env.do(env.adapter.engine.start_run("routed", {}))
    env.do(env.adapter.flush([s for s in scheduled if s[1].node_id == "w"]))
    a_job = next(job for _, job in scheduled if job.node_id == "a")
    env.step_without_queueing(a_job)  # a chose "ok"; the job for b was committed, then the worker died
    env.drain()  # runs w (awaits); b is lost
    env.wait_idle(run_id, 1)
    stats = env.sweep(threshold=1)
    assert stats.stalled_runs == 1 and stats.runs[0].nodes == ["b"]
    env.drain()
    view = env.do(env.adapter.inspect(run_id))
    statuses = {n.node_id: n.status for n in view.nodes}
    assert statuses == {"a": "completed", "b": "completed", "c": "skipped", "w": "awaiting"}


def test_healthy_long_node_is_not_stalled(env):
    run_id = env.do(env.adapter.start_run("simple", {}))
    # the job for x is queued in arq (alive): idle, but nothing is lost
    env.wait_idle(run_id, 1)
    stats = env.sweep(threshold=1)
    assert stats.stalled_runs == 0 and stats.reconciled_runs == 0
    assert env.do(env.adapter.reconcile(run_id)).planned == []


def test_dry_run_changes_nothing(env, redis_sync):
    env.start_unqueued("simple")
    run_id = env.start_unqueued("routed")
    env.wait_idle(run_id, 1)

    read = {b"hash": redis_sync.hgetall, b"string": redis_sync.get, b"list": lambda k: redis_sync.lrange(k, 0, -1),
            b"zset": lambda k: redis_sync.zrange(k, 0, -1, withscores=True), b"set": redis_sync.smembers}

    def dump():
        # every key's content (not DUMP's bytes: a large hash's DUMP follows its table's order, which a mere
        # read moves on while the table is being rehashed)
        return {k: (t, read[t](k), redis_sync.pttl(k) // 60000)
                for k in redis_sync.scan_iter("*") for t in [redis_sync.type(k)]}

    before = dump()  # reading every key resets their idle clocks: wait again
    env.wait_idle(run_id, 1)
    stats = env.sweep(threshold=1, dry_run=True)
    assert stats.stalled_runs == 2 and stats.reconciled_runs == 0
    assert sorted(r.enqueued for r in stats.runs) == [1, 2]  # simple: x; routed: a and w (two start nodes)
    assert dump() == before


def test_reconcile_one_run_api_and_failures_counted(env, redis_sync):
    run_id = env.start_unqueued("simple")
    outcome = env.do(env.adapter.reconcile(run_id))
    assert [j.node_id for j in outcome.planned] == ["x"] and len(outcome.enqueued) == 1
    assert env.do(env.adapter.reconcile(run_id)).planned == []  # now queued: nothing to do
    # a corrupt run record: counted as failed, the sweep goes on
    redis_sync.hset("flowcraft:run:broken", mapping={"status": '"running"', "blueprint_id": '"simple"',
                                                     "blueprint_version": '"x"', "pending": "1", "updated_at": "0"})
    redis_sync.hset("flowcraft:outbox:broken", "j", "{not json")
    redis_sync.hset("workflow:state:broken", "k", "1")
    stats = env.sweep(threshold=0)
    assert stats.failed_runs == 1 and stats.runs[0].run_id == "broken" and stats.runs[0].error


def test_two_reconcile_processes_enqueue_once(tmp_path, redis_url, redis_sync):
    project = Project(tmp_path, redis_url, extra_blueprints={"simple": SIMPLE.replace("uses: tag", "uses: noop")})
    env = Env(redis_url, queue=project.queue)
    try:
        lost = [env.start_unqueued("simple") for _ in range(20)]
        env.wait_idle(lost[-1], 1)
        cmd = [sys.executable, "-m", "flowcraft_cli", "reconcile", "--threshold", "1", "--json"]
        procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
        docs = [json.loads(o) for o, _ in outs]
        assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
        enqueued = sum(r["enqueued"] for d in docs for r in d["runs"])
        assert enqueued == 20
        assert redis_sync.zcard(project.queue) == 20
        assert sum(d["reconciled_runs"] for d in docs) == 20
    finally:
        env.close()


def test_reconcile_cli_table_and_exit_code(tmp_path, redis_url, redis_sync):
    project = Project(tmp_path, redis_url)
    r = project.cli("reconcile", "--threshold", "1")
    assert r.returncode == 0 and "scanned_keys" in r.stdout
    redis_sync.hset("flowcraft:run:broken", mapping={"status": '"running"', "blueprint_id": '"nope"',
                                                     "blueprint_version": '"x"', "pending": "1", "updated_at": "0"})
    redis_sync.hset("workflow:state:broken", "k", "1")
    r = project.cli("reconcile", "--threshold", "0", "--json")
    doc = json.loads(r.stdout)
    # a run whose blueprint nobody knows cannot be judged: skipped, said why, never counted as failed
    assert r.returncode == 0 and doc["failed_runs"] == 0 and doc["stalled_runs"] == 0
    assert doc["runs"][0]["skipped"] == "blueprint definition not found" and not doc["runs"][0]["error"]
    # one whose definition is known but whose outbox is corrupt is a failure
    redis_sync.set("flowcraft:blueprint:nope:x", json.dumps({"id": "nope", "nodes": [{"id": "a", "uses": "noop"}]}))
    redis_sync.hset("flowcraft:outbox:broken", "j", "{not json")
    r = project.cli("reconcile", "--threshold", "0", "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and doc["failed_runs"] == 1 and doc["runs"][0]["error"]


def test_reconcile_interval_sweeps_until_sigterm(tmp_path, redis_url, redis_sync):
    import signal as sig

    Project(tmp_path, redis_url)
    proc = subprocess.Popen([sys.executable, "-m", "flowcraft_cli", "reconcile", "--interval", "0.2", "--json"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        wait_for(lambda: lines.append(proc.stdout.readline()) or len(lines) >= 3, 30, "three sweeps")
    finally:
        proc.send_signal(sig.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    docs = [json.loads(line) for line in lines + out.splitlines() if line.strip()]
    assert len(docs) >= 3 and all(d["failed_runs"] == 0 and "scanned_keys" in d for d in docs)
