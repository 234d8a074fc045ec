"""Read-only views of a queue's runs that need nothing but Redis (CONTRACT §10): one run (``inspect``) and
the run index (``runs``). No arq, no engine, no loader: a view from any directory starts fast and reads
blueprint layouts from the definitions runs record when they start."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput
from ..store import RUN, loads
from ..view import RunView, iso, read_run
from . import keys
from .definitions import read_outline
from .redis_store import RedisStore
from .workers import WorkerRegistry

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ..blueprint import Blueprint

RUN_STATUSES = ("running", "awaiting", "completed", "failed", "cancelled")
_SUMMARY_FIELDS = ("status", "blueprint_id", "blueprint_version", "created_at", "finished_at", "reason",
                   "failed_node")


@dataclass
class RunSummary:
    """One line of ``flowcraft runs``."""

    run_id: str
    blueprint_id: str
    blueprint_version: str
    status: str
    created_at: int | None
    finished_at: int | None
    reason: str | None
    failed_node: str | None

    def duration_ms(self, now_ms: int) -> int | None:
        if self.created_at is None:
            return None
        return max(0, (self.finished_at or now_ms) - self.created_at)

    def to_json(self, now_ms: int) -> dict[str, Any]:
        return {"run_id": self.run_id, "blueprint_id": self.blueprint_id,
                "blueprint_version": self.blueprint_version, "status": self.status,
                "started_at": iso(self.created_at), "finished_at": iso(self.finished_at),
                "duration_ms": self.duration_ms(now_ms), "failed_node": self.failed_node, "reason": self.reason}


class RunReader:
    """Reads runs of one queue. ``blueprints``: those loaded in this process, if any (a worker's); any other
    blueprint's layout comes from the definition its run recorded in Redis."""

    def __init__(self, redis: Redis, queue_name: str, *, lease_s: float = 15,
                 blueprints: Mapping[str, Blueprint] | None = None, store: RedisStore | None = None,
                 workers: WorkerRegistry | None = None) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.blueprints: Mapping[str, Blueprint] = blueprints if blueprints is not None else {}
        self.store = store or RedisStore(redis)
        self.workers = workers or WorkerRegistry(redis, queue_name, "reader", lease_s)

    async def inspect(self, run_id: str, *, timeline: bool = True) -> RunView:
        view = await read_run(self.store, self.blueprints, run_id, timeline=timeline, outline=self._outline)
        await self._annotate(view)
        return view

    async def _outline(self, blueprint_id: str, version: str) -> list[tuple[str, str]] | None:
        return await read_outline(self.redis, blueprint_id, version)

    async def _annotate(self, view: RunView) -> None:
        """Honest state while a fault is being recovered: a running node whose worker stopped heartbeating
        says so, and a queued node that no live worker can run says why (CONTRACT §6.1)."""
        running = [n for n in view.nodes if n.status == "running" and n.worker]
        queued = [n for n in view.nodes if n.status == "queued"]
        if not running and not queued or view.status not in ("running", "awaiting"):
            return
        workers = {w.worker_id: w for w in await self.workers.workers()}
        now = await self.workers.server_time_ms()
        for n in running:
            w = workers.get(n.worker or "")
            if w is None or not w.alive:
                since = f" {max(0, now - w.heartbeat_at - self.workers.lease_ms) // 1000} s ago" \
                    if w is not None and w.heartbeat_at else ""
                n.detail = f"worker lost{since}"
        live = [w for w in workers.values() if w.alive]
        if queued and live and not any(w.blueprints.get(view.blueprint_id) == view.blueprint_version for w in live):
            why = f"no live worker serves blueprint {view.blueprint_id!r} version {view.blueprint_version}"
            for n in queued:
                n.detail = why
        elif queued and not live:
            for n in queued:
                n.detail = f"no live worker on queue {self.queue_name!r}"

    async def list_runs(self, *, status: str | None = None, blueprint_id: str | None = None,
                        since_ms: int | None = None, limit: int = 20) -> list[RunSummary]:
        """The queue's runs, newest first, from its run index (never a SCAN): ``status`` reads the index of
        its status group, ``since_ms`` (epoch ms) bounds the creation time; entries whose run is gone are
        skipped. A filter the index does not cover (``blueprint_id``) reads further pages until ``limit``
        runs matched or the index ends."""
        if status is not None and status not in RUN_STATUSES:
            raise InvalidInput(f"--status {status!r}: expected one of {', '.join(RUN_STATUSES)}")
        if limit < 1:
            return []
        groups = keys.RUN_GROUPS if status is None else (keys.run_group(status),)
        newest = _Newest(self.redis, [keys.runs_by_status_key(g, self.queue_name) for g in groups],
                         "-inf" if since_ms is None else since_ms)
        out: list[RunSummary] = []
        page = max(limit, 50)
        while len(out) < limit:
            run_ids = await newest.take(page)
            if not run_ids:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for run_id in run_ids:
                    pipe.hmget(keys.kind_key(RUN, run_id), list(_SUMMARY_FIELDS))
                rows = await pipe.execute()
            for run_id, row in zip(run_ids, rows, strict=True):
                if row[0] is None:
                    continue  # its keys expired; the next index write drops the entry
                summary = _summary(run_id, row)
                if (status is None or summary.status == status) and \
                        (blueprint_id is None or summary.blueprint_id == blueprint_id):
                    out.append(summary)
                    if len(out) == limit:
                        break
            page = min(page * 4, 5000)
        return out


class _Newest:
    """Run ids of several groups of the run index, newest first: a merge of their pages (a run's status groups
    together are all its runs), each page a ZREVRANGEBYSCORE of one group from the last score taken of it,
    not from an offset (runs leave a group as it is read, which would shift the rest past an offset). A run
    that moves to another group while it is read may be met twice (the second time is skipped) or not at
    all."""

    def __init__(self, redis: Redis, groups: list[str], low: int | str) -> None:
        self.redis = redis
        self.low = low
        self.heads: dict[str, list[tuple[str, float]]] = {g: [] for g in groups}  # fetched, not taken, newest last
        self.bound: dict[str, float | str] = dict.fromkeys(groups, "+inf")  # the last score taken of each
        self.tied = dict.fromkeys(groups, 0)  # how many taken of each at that score (one ms: several runs)
        self.more = set(groups)  # groups that may hold more than was fetched
        self.seen: set[str] = set()

    async def take(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            for group in self.heads:
                if not self.heads[group] and group in self.more:
                    await self._fetch(group, max(n, 50))
            live = [g for g in self.heads if self.heads[g]]
            if not live:
                break
            group = max(live, key=lambda g: self.heads[g][-1][1])
            run_id, score = self.heads[group].pop()
            if score == self.bound[group]:
                self.tied[group] += 1
            else:
                self.bound[group], self.tied[group] = score, 1
            if run_id != keys.GROUP_PLACEHOLDER and run_id not in self.seen:
                self.seen.add(run_id)
                out.append(run_id)
        return out

    async def _fetch(self, group: str, n: int) -> None:
        # the last score taken is read again (the runs of one ms share it): past those taken at it already
        tied = self.tied[group]
        got = await self.redis.zrevrangebyscore(group, self.bound[group], self.low, start=0, num=n + tied,
                                                withscores=True)
        if len(got) < n + tied:
            self.more.discard(group)
        self.heads[group] = [(_s(r), score) for r, score in reversed(got)]


def _summary(run_id: str, row: list[Any]) -> RunSummary:
    v = {f: None if raw is None else loads(raw, lenient=True) for f, raw in zip(_SUMMARY_FIELDS, row, strict=True)}

    def text(x: Any) -> str | None:
        return None if x is None else str(x)

    def ms(x: Any) -> int | None:
        return x if isinstance(x, int) and not isinstance(x, bool) else None

    return RunSummary(run_id, text(v["blueprint_id"]) or "?", text(v["blueprint_version"]) or "",
                      text(v["status"]) or "?", ms(v["created_at"]), ms(v["finished_at"]), text(v["reason"]),
                      text(v["failed_node"]))


def parse_since(text: str, now_ms: int | None = None) -> int:
    """``--since``: a duration back from now (``90s``, ``15m``, ``2h``, ``7d``, ``1w``; a bare number is
    seconds), as epoch milliseconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in units else "s"
    number = raw[:-1] if raw[-1:] in units else raw
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = -1
    if not number or not 0 <= seconds < 1e11:  # also refuses nan and inf
        raise InvalidInput(f"--since {text!r}: expected a duration such as 90s, 15m, 2h, 7d or 1w")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return now - int(seconds * 1000)


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
