"""``flowcraft migrate``: runs that an earlier version started, moved into this version's layout.

Earlier versions kept a run's node records, join arrivals and events in keys of their own
(``keys.legacy_keys``); this one keeps them in the run's hash (``keys.kind_key``), and a worker of this
version does not look for them anywhere else. Each run is moved by one Lua call, so a run is never seen half
moved: its fields are added to the run's hash (a field the hash holds already is kept: it is newer), its
events are numbered after those the hash holds, and the old keys are deleted. The run's hash keeps its own
expiry (it is the key the run's meta always had). Workers of the earlier version must be stopped first: one
would go on writing the old keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..store import JOINS, NODES, RUN
from . import keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

# KEYS: the run's hash, its old node records, join arrivals, events. ARGV: the node and join field prefixes,
# the events prefix, the events count field. Returns the number of fields and events moved, or -1 when the
# run's hash is gone (an expired run: its old keys expire too, and are left to)
_MOVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local moved = 0
for i = 2, 3 do
  local all = redis.call('HGETALL', KEYS[i])
  for j = 1, #all, 2 do
    moved = moved + redis.call('HSETNX', KEYS[1], ARGV[i - 1] .. all[j], all[j + 1])
  end
end
local events = redis.call('LRANGE', KEYS[4], 0, -1)
if #events > 0 then
  local count = tonumber(redis.call('HGET', KEYS[1], ARGV[4]) or '0') or 0
  for j, e in ipairs(events) do redis.call('HSET', KEYS[1], ARGV[3] .. (count + j), e) end
  redis.call('HSET', KEYS[1], ARGV[4], count + #events)
  moved = moved + #events
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return moved
"""


@dataclass
class Migration:
    runs: list[str] = field(default_factory=list)  # runs moved (or, with dry_run, to move)
    fields: int = 0  # node records, join arrivals and events moved
    gone: list[str] = field(default_factory=list)  # old keys of runs whose hash expired: left to expire

    def to_json(self) -> dict[str, Any]:
        return {"runs": len(self.runs), "fields": self.fields, "expired_runs": len(self.gone),
                "run_ids": self.runs}


async def migrate(redis: Redis, *, dry_run: bool = False) -> Migration:
    """Move every run kept in the earlier layout (found by SCAN of the old keys) into the run's hash."""
    run_ids: set[str] = set()
    for prefix in (keys.LEGACY_NODES_PREFIX, keys.LEGACY_JOINS_PREFIX, keys.LEGACY_EVENTS_PREFIX):
        async for key in redis.scan_iter(match=prefix + "*", count=1000):
            run_ids.add((key.decode() if isinstance(key, bytes) else key)[len(prefix):])
    out = Migration()
    move = redis.register_script(_MOVE)
    for run_id in sorted(run_ids):
        if dry_run:
            out.runs.append(run_id)
            continue
        moved = int(await move(keys=[keys.kind_key(RUN, run_id), *keys.legacy_keys(run_id)],
                               args=[keys.FIELD_PREFIX[NODES], keys.FIELD_PREFIX[JOINS],
                                     keys.FIELD_PREFIX[keys.EVENTS], keys.EVENT_COUNT]))
        if moved < 0:
            out.gone.append(run_id)
        else:
            out.runs.append(run_id)
            out.fields += moved
    return out
