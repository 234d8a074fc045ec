"""The reconciler: find stalled runs and resume them (seed API: ``create_arq_reconciler(...).run()``).

How a stall is detected. The seed uses ``OBJECT IDLETIME`` on the run-state hash, which any read resets (a
run that ``inspect`` polls never looks stalled), which a restart from AOF resets, and which errors under an
LFU eviction policy; and it counts finished runs. Here every step of a run also writes
``flowcraft:progress:<run_id>``, a key nothing else reads, so its ``OBJECT IDLETIME`` is the time since the
run last made progress, on the Redis server's clock. Where ``OBJECT IDLETIME`` is unavailable (LFU) the
time that key holds (each commit writes its own clock's) is used instead.

A run is *stalled* when it is ``running``, idle longer than the threshold, and some step it is waiting for
is not alive: a job in its outbox that never reached the queue, or a queued/running/sleeping node whose arq
job is gone and whose claim lease has lapsed. A run of any other status is looked at only when its outbox
holds entries (a finished or awaiting subflow child whose note to its parent was never queued), and is
stalled only if such a note is not alive. Finished and awaiting runs with nothing pending are never
stalled; a healthy node
that runs longer than the threshold is alive (its job is in progress), so it is not run twice; and since
only steps that routing already decided are resumed, a branch that was not taken is never run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.asyncio import Redis

from ..errors import BlueprintUnavailable
from ..store import OUTBOX, RUN
from . import keys

log = logging.getLogger("flowcraft.reconciler")

# One call per SCAN page: for each run id (ARGV[6..]), skip unless the run's meta says "running" or its outbox
# holds entries (whatever its status: a finished child's note to its parent may sit there); take its idle
# time from OBJECT IDLETIME of its progress key (never read by anything, so reads of the run cannot reset it),
# else, where OBJECT is refused (an LFU eviction policy), from the time the progress key holds (every commit
# writes it), else from the meta's updated_at (written by versions before the one-call commit), else from its
# created_at (a run's start writes no progress key: its first step a second later, or its end, does).
# Returns {run_id, blueprint_id, idle_ms, queue} for those runs idle longer than the threshold (queue: the meta's
# JSON queue name, recorded at the run's start, or 'null' for a run that recorded none).
# ARGV: [1] meta key prefix, [2] progress key prefix, [3] now (ms), [4] threshold (s), [5] outbox key prefix,
# [6..] run ids. Keys are derived from run ids inside the script, which standalone Redis allows (arq rules out
# Cluster anyway).
_TRIAGE = """
local out = {}
local now, threshold_ms = tonumber(ARGV[3]), tonumber(ARGV[4]) * 1000
for i = 6, #ARGV do
  local run_id = ARGV[i]
  local meta = redis.call('HMGET', ARGV[1] .. run_id, 'status', 'blueprint_id', 'updated_at', 'queue', 'created_at')
  if meta[1] == '"running"' or (meta[1] and redis.call('EXISTS', ARGV[5] .. run_id) == 1) then
    local idle_ms = nil
    local ok, idle = pcall(redis.call, 'OBJECT', 'IDLETIME', ARGV[2] .. run_id)
    if ok and idle then
      idle_ms = idle * 1000
    else
      local stamp = redis.call('GET', ARGV[2] .. run_id) or meta[3] or meta[5]
      if stamp then idle_ms = now - tonumber(stamp) end
    end
    if idle_ms == nil then
      idle_ms = threshold_ms + 1
    end
    if idle_ms > threshold_ms then
      out[#out + 1] = {run_id, meta[2] or 'null', tostring(math.floor(idle_ms)), meta[4] or 'null'}
    end
  end
end
return out
"""


@dataclass
class StalledRun:
    run_id: str
    blueprint_id: str | None
    idle_seconds: float
    enqueued: int = 0
    nodes: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None  # why this sweep could not judge the run (never counted as failed)


@dataclass
class ReconciliationStats:
    scanned_keys: int = 0
    stalled_runs: int = 0
    reconciled_runs: int = 0
    failed_runs: int = 0
    runs: list[StalledRun] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"scanned_keys": self.scanned_keys, "stalled_runs": self.stalled_runs,
                "reconciled_runs": self.reconciled_runs, "failed_runs": self.failed_runs}

    def to_json(self) -> dict[str, Any]:
        return {**self.counts(), "runs": [
            {k: v for k, v in asdict(r).items() if k in ("run_id", "idle_seconds", "enqueued", "error", "skipped")}
            | {"blueprint_id": r.blueprint_id, "nodes": r.nodes} for r in self.runs]}


class Reconciler:
    def __init__(self, adapter: Any, redis: Redis, *, stalled_threshold_seconds: float = 300,
                 key_prefix: str = keys.STATE_PREFIX, scan_count: int = 100, dry_run: bool = False) -> None:
        self.adapter = adapter
        self.redis = redis
        self.threshold_s = stalled_threshold_seconds
        self.key_prefix = key_prefix
        self.scan_count = scan_count
        self.dry_run = dry_run
        self._triage = redis.register_script(_TRIAGE)

    async def run(self) -> ReconciliationStats:
        """One sweep: SCAN the run-state keys; one script call per SCAN page picks the runs idle past the
        threshold that are running or hold undelivered jobs (no per-key round trip); only those are looked at more closely."""
        stats = ReconciliationStats()
        if not self.dry_run:
            # the steps of workers that stopped heartbeating: every live worker recovers them too, so this
            # matters only when no worker of the queue is left
            await self.adapter.recover_dead_workers()
        cursor = 0
        match = self.key_prefix + "*"
        while True:
            next_cursor, page = await self.redis.scan(cursor=cursor, match=match, count=self.scan_count)
            cursor = int(next_cursor)
            if page:
                await self._check_page([_s(k)[len(self.key_prefix):] for k in page], stats)
            if int(cursor) == 0:
                break
        return stats

    async def _check_page(self, run_ids: list[str], stats: ReconciliationStats) -> None:
        stats.scanned_keys += len(run_ids)
        replies = await self._triage(
            keys=[],
            args=[keys.kind_key(RUN, ""), keys.progress_key(""), int(time.time() * 1000), self.threshold_s,
                  keys.kind_key(OUTBOX, ""), *run_ids],
        )
        for run_id, blueprint_id, idle_ms, queue in replies:
            run_id, blueprint_id, idle_s, queue = _s(run_id), _json_str(blueprint_id), int(idle_ms) / 1000, _json_str(queue)
            mine = getattr(self.adapter, "queue_name", None)
            if queue not in (None, "null") and mine is not None and queue != mine:
                # another project's run: its steps belong on its own queue, and only its reconciler queues them
                stats.runs.append(StalledRun(run_id, blueprint_id, idle_s, skipped=f"a run of queue {queue!r}"))
                continue
            await self._reconcile(run_id, blueprint_id, idle_s, stats)

    async def _reconcile(self, run_id: str, blueprint_id: str | None, idle_s: float,
                         stats: ReconciliationStats) -> None:
        try:
            outcome = await self.adapter.reconcile(run_id, dry_run=self.dry_run)
        except BlueprintUnavailable:
            # nothing can be decided for a run whose blueprint nobody here knows: not a failure of the sweep
            stats.runs.append(StalledRun(run_id, blueprint_id, idle_s, skipped="blueprint definition not found"))
            return
        except Exception as e:  # one broken run must not stop the sweep
            log.warning("reconcile %s failed: %s", run_id, e)
            stats.stalled_runs += 1
            stats.failed_runs += 1
            stats.runs.append(StalledRun(run_id, blueprint_id, idle_s, error=f"{type(e).__name__}: {e}"))
            return
        if not outcome.planned:
            return  # idle, but every step it waits for is alive (e.g. a long node): not stalled
        stats.stalled_runs += 1
        enqueued = len(outcome.planned) if self.dry_run else len(outcome.enqueued)
        if enqueued and not self.dry_run:
            stats.reconciled_runs += 1
        stats.runs.append(StalledRun(run_id, blueprint_id, idle_s, enqueued,
                                     sorted({j.node_id for j in outcome.planned})))


def create_arq_reconciler(*, adapter: Any, redis: Redis, stalled_threshold_seconds: float = 300,
                          key_prefix: str = keys.STATE_PREFIX, scan_count: int = 100,
                          dry_run: bool = False) -> Reconciler:
    return Reconciler(adapter, redis, stalled_threshold_seconds=stalled_threshold_seconds, key_prefix=key_prefix,
                      scan_count=scan_count, dry_run=dry_run)


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _json_str(value: Any) -> str | None:
    """Meta fields are JSON: '"running"' -> 'running'."""
    if value is None or isinstance(value, Exception):
        return None
    text = _s(value)
    return text[1:-1] if len(text) >= 2 and text[0] == '"' == text[-1] else text
