"""A read-only picture of one run (summary, node table, context): what ``inspect``, ``run`` and
``enqueue --wait`` show. Works on any Store."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .errors import RunNotFound
from .store import NODES, RUN, STATE, Store

if TYPE_CHECKING:
    from .blueprint import Blueprint

#: (blueprint id, version) -> [(node id, uses)] in document order, or None: where a view finds the layout of
#: a blueprint this process did not load (distributed.definitions.read_outline)
OutlineSource = Callable[[str, str], Awaitable[list[tuple[str, str]] | None]]


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class NodeView:
    node_id: str
    uses: str
    status: str
    attempts: int
    started_at: int | None
    finished_at: int | None
    error: str | None
    worker: str | None = None
    runs: int = 0
    note: str = ""
    detail: str = ""  # why a running or queued node is not progressing (worker lost, no worker serves it)
    history: list[dict[str, Any]] = field(default_factory=list)  # its ended attempts, from the run's events

    @property
    def duration_ms(self) -> int | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0, self.finished_at - self.started_at)

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "status": self.status, "attempts": self.attempts,
                "started_at": iso(self.started_at), "finished_at": iso(self.finished_at),
                "duration_ms": self.duration_ms, "error": self.error, "worker": self.worker, "runs": self.runs,
                **({"detail": self.detail} if self.detail else {}),
                "attempts_history": [attempt_json(a) for a in self.history]}


@dataclass
class RunView:
    run_id: str
    blueprint_id: str
    blueprint_version: str
    status: str
    reason: str | None
    created_at: int | None
    finished_at: int | None
    nodes: list[NodeView]
    context: dict[str, Any]
    awaiting_nodes: list[str] = field(default_factory=list)
    parent: dict[str, Any] | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def outputs(self) -> dict[str, Any]:
        return {k[len("_outputs."):]: v for k, v in self.context.items() if k.startswith("_outputs.")}

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "blueprint_id": self.blueprint_id,
                "blueprint_version": self.blueprint_version, "status": self.status, "reason": self.reason,
                "created_at": iso(self.created_at), "finished_at": iso(self.finished_at),
                "awaiting_nodes": self.awaiting_nodes,
                "nodes": [n.to_json() for n in self.nodes], "context": self.context, "outputs": self.outputs,
                "timeline": [{**e, "started_at": iso(e.get("started_at")), "finished_at": iso(e.get("finished_at"))}
                             for e in self.timeline]}


async def read_run(store: Store, blueprints: Mapping[str, Blueprint], run_id: str, *,
                   timeline: bool = True, outline: OutlineSource | None = None) -> RunView:
    """``timeline=False`` skips reading the run's events (a poller that only wants statuses). Nodes come in
    blueprint order: the loaded blueprint's at the run's version, else ``outline``'s, else the loaded one's."""
    meta = await store.read_all(run_id, RUN)
    if not meta.get("status"):
        raise RunNotFound(f"run {run_id!r} not found (it never existed or its keys expired)")
    records = await store.read_all(run_id, NODES, lenient=True)
    context = await store.read_all(run_id, STATE, lenient=True)  # a corrupt value is shown, not fatal
    bp = blueprints.get(meta["blueprint_id"])
    layout = [(n.id, n.uses) for n in bp.nodes] if bp else []
    if (bp is None or bp.version != meta.get("blueprint_version")) and outline is not None:
        layout = await outline(str(meta["blueprint_id"]), str(meta.get("blueprint_version") or "")) or layout
    uses_of = dict(layout)
    order = list(uses_of)
    order += sorted(k for k in records if k not in uses_of)
    finished_ok = meta["status"] == "completed"
    nodes = []
    for node_id in order:
        rec = records.get(node_id)
        uses = uses_of.get(node_id, "?")
        if rec is None:
            # never reached: in a completed run that means no taken edge led there (e.g. an unused fallback)
            nodes.append(NodeView(node_id, uses, "skipped" if finished_ok else "pending", 0, None, None, None))
            continue
        if isinstance(rec, str):  # a record that is not JSON (store.loads): shown, not fatal
            nodes.append(NodeView(node_id, uses, "?", 0, None, None, rec))
            continue
        note = ""
        if rec.get("fallback"):
            note = f"fallback {rec['fallback']} stood in" if rec["status"] == "failed" and meta["status"] != "failed" else ""
        if rec.get("fallback_for"):
            note = f"fallback for {rec['fallback_for']}"
        if rec.get("items"):
            note = f"{rec['items']} items"
        attempts = rec.get("exec_attempts") or rec.get("attempt", 0)
        if rec["status"] in ("pending", "skipped") and not rec.get("runs"):
            attempts = 0
        if rec["status"] == "completed" and attempts > 1 and not note:
            note = f"succeeded on attempt {attempts}"
        nodes.append(NodeView(node_id, uses, rec["status"], attempts, rec.get("started_at"), rec.get("finished_at"),
                              rec.get("error"), rec.get("worker"), rec.get("runs", 0), note))
    attempts = timeline_of(await store.read_events(run_id)) if timeline else []
    by_node: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:
        by_node.setdefault(a["node_id"], []).append(a)
    for n in nodes:
        n.history = by_node.get(n.node_id, [])
    return RunView(run_id, meta["blueprint_id"], meta.get("blueprint_version", ""), meta["status"], meta.get("reason"),
                   meta.get("created_at"), meta.get("finished_at"), nodes, context,
                   list(meta.get("awaiting_nodes") or []), meta.get("parent"), attempts)


# the engine's NodeTimeout message, also behind a batch item's "item N: " prefix
_TIMED_OUT = re.compile(r"^(item \d+: )?attempt \d+ timed out\b")


def attempt_json(a: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of a node's ``attempts_history`` (CONTRACT §10)."""
    return {"attempt": a["attempt"], "worker": a["worker"], "started_at": iso(a["started_at"]),
            "finished_at": iso(a["finished_at"]), "outcome": a["outcome"], "error": a["error"],
            "traceback": a["traceback"],
            **({"item": a["item"]} if "item" in a else {}), **({"fallback": a["fallback"]} if "fallback" in a else {})}


def timeline_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every attempt that ended, in order: node, attempt, worker, start, end, duration, error; an attempt whose
    worker died is there too, as ``lost``, one cut short by a cancel as ``cancelled``, and one that overran its
    limit as ``timed_out``."""
    outcomes = {"node_completed": "completed", "attempt_failed": "failed", "attempt_lost": "lost",
                "attempt_cancelled": "cancelled"}
    out = []
    for e in events:
        if e.get("type") not in outcomes:
            continue
        start = e.get("started_at")
        outcome = outcomes[e["type"]]
        if outcome == "failed" and _TIMED_OUT.match(e.get("error") or ""):
            outcome = "timed_out"
        out.append({"node_id": e["node"], "attempt": e.get("attempt"), "worker": e.get("worker"),
                    "started_at": start, "finished_at": e["ts"],
                    "duration_ms": None if start is None else max(0, e["ts"] - start),
                    "outcome": outcome,
                    "error": e.get("error"), "traceback": e.get("traceback"),
                    **({"item": e["item"]} if "item" in e else {}),
                    **({"fallback": e["fallback"]} if "fallback" in e else {})})
    return out


