"""``flowcraft migrate``: a run an earlier version left mid-flight (node records, join arrivals and events in
keys of their own) is moved into the run's hash and finishes on this version's workers."""

from __future__ import annotations

import asyncio
import json

from redis.asyncio import Redis

from flowcraft_cli.distributed import keys
from flowcraft_cli.distributed.migrate import migrate
from tests.e2e import Project
from tests.harness import make_adapter

FAN = """
id: fan
nodes:
  - {id: s, uses: tag}
  - {id: x, uses: tag}
  - {id: y, uses: tag}
  - {id: j, uses: tag}
edges:
  - {source: s, target: x}
  - {source: s, target: y}
  - {source: x, target: j}
  - {source: y, target: j}
"""


async def _as_earlier_version(r: Redis, run_id: str) -> None:
    """Put the run's node records, join arrivals and events where an earlier version kept them."""
    run = keys.kind_key("run", run_id)
    fields = {k.decode(): v for k, v in (await r.hgetall(run)).items()}
    nodes, joins, events = keys.legacy_keys(run_id)
    for prefix, key in (("n:", nodes), ("j:", joins)):
        moved = {f[2:]: v for f, v in fields.items() if f.startswith(prefix)}
        if moved:
            await r.hset(key, mapping=moved)
    numbered = sorted((int(f[2:]), v) for f, v in fields.items() if f.startswith("e:"))
    await r.rpush(events, *(v for _, v in numbered))
    await r.hdel(run, "events", *(f for f in fields if f[:2] in ("n:", "j:", "e:")))


def test_a_run_left_mid_flight_by_an_earlier_version_finishes_after_migrate(redis_url):
    calls: list[str] = []

    def tag(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    async def go():
        a = make_adapter(Redis.from_url(redis_url), [FAN], {"tag": tag}, queue_name="migrate-q")
        r = a.redis
        run_id, scheduled = await a.engine.start_run("fan", {})
        s = await a.engine.handle(scheduled[0][1])
        x = next(job for _, job in s.scheduled if job.node_id == "x")
        await a.engine.handle(x)  # j has one arrival of two
        await _as_earlier_version(r, run_id)
        a.store.forget(run_id)
        dry = await migrate(r, dry_run=True)
        done = await migrate(r)
        again = await migrate(r)  # nothing left to move
        left = [k for k in keys.legacy_keys(run_id) if await r.exists(k)]
        await a.start(burst=True)  # y, then j
        view = await a.inspect(run_id)
        events = await a.store.read_events(run_id)
        await a.close()
        await r.aclose()
        return run_id, dry, done, again, left, view, events

    run_id, dry, done, again, left, view, events = asyncio.run(go())
    assert dry.runs == [run_id] and dry.fields == 0
    assert done.runs == [run_id] and done.fields == 3 + 2 + 3  # s, x, y records; j's arrival and count; 3 events
    assert again.runs == [] and left == []
    assert view.status == "completed" and sorted(calls) == ["j", "s", "x", "y"]
    assert view.context["_inputs.j"] == {"x": "x", "y": "y"}
    assert [(e["type"], e.get("node")) for e in events] == [
        ("run_started", None), ("node_completed", "s"), ("node_completed", "x"), ("node_completed", "y"),
        ("node_completed", "j"), ("run_finished", None)]


def test_migrate_command(tmp_path, redis_url):
    project = Project(tmp_path, redis_url)
    r = project.cli("migrate", "--json", check=True)
    assert json.loads(r.stdout) == {"runs": 0, "fields": 0, "expired_runs": 0, "run_ids": [], "dry_run": False}
    human = project.cli("migrate", "--dry-run", check=True)
    assert human.stdout.startswith("would move 0 run(s)")
