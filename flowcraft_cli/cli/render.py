"""All rich output. User data is wrapped in ``Text`` so a node id like ``[bold]`` prints as written."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..view import NodeView, RunView, iso
from .output import error, print_json  # noqa: F401  (re-exported: render.print_json, render.error)

# piped output (CI logs, `| less`) gets a roomy fixed width instead of rich's 80-column fallback
out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

STATUS_STYLE = {
    "completed": "green", "failed": "red", "cancelled": "magenta", "awaiting": "yellow", "running": "cyan",
    "queued": "blue", "pending": "dim", "skipped": "dim", "sleeping": "yellow", "lost": "red", "alive": "green",
    "timed_out": "red",
}


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def short(value: Any, limit: int = 80) -> str:
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def duration(ms: int | None) -> str:
    if ms is None:
        return "–"
    if ms < 1000:
        return f"{ms} ms"
    return f"{ms / 1000:.2f} s"


def run_view(view: RunView, *, context_limit: int = 20) -> Group:
    head = Text.assemble(("run ", "bold"), (view.run_id, "bold"), "  ", (view.blueprint_id, ""), " v",
                         view.blueprint_version or "?", "  ", status_text(view.status))
    parts: list[Any] = [head]
    if view.reason:
        parts.append(Text("reason: ", style="bold") + Text(view.reason))
    if view.awaiting_nodes:
        parts.append(Text("awaiting: " + ", ".join(view.awaiting_nodes), style="yellow"))
    table = Table(title="nodes", title_justify="left", expand=False)
    for col in ("node", "uses", "status", "attempts", "duration", "worker"):
        table.add_column(col, no_wrap=col != "node")
    table.add_column("error / note", overflow="fold", ratio=1)
    for n in view.nodes:
        status = status_text(n.status) + (Text(f" ({n.detail})", style="red") if n.detail else Text(""))
        table.add_row(Text(n.node_id), Text(n.uses), status, str(n.attempts or "–"),
                      duration(n.duration_ms), Text(n.worker or "–"), Text(n.error or n.note or "", style="red" if n.error else "dim"))
    parts.append(table)
    ctx = Table(title="context", title_justify="left", expand=False)
    ctx.add_column("key", overflow="fold")
    ctx.add_column("value", overflow="fold")
    items = sorted((k, v) for k, v in view.context.items() if not k.startswith("_inputs."))
    for k, v in items[:context_limit]:
        ctx.add_row(Text(k), Text(short(v)))
    if len(items) > context_limit:
        ctx.add_row(Text(f"… {len(items) - context_limit} more", style="dim"), Text(""))
    parts.append(ctx)
    if view.timeline and any(t["outcome"] in ("failed", "timed_out", "lost", "cancelled") for t in view.timeline):
        parts.append(timeline_table(view))
    return Group(*parts)


def timeline_table(view: RunView, limit: int = 40) -> Table:
    """Attempts in the order they ended, with real durations (shown when any attempt failed or was lost)."""
    t = Table(title="attempts", title_justify="left", expand=False)
    for col in ("+ms", "node", "attempt", "worker", "duration", "outcome"):
        t.add_column(col, no_wrap=True)
    t.add_column("error", overflow="fold")
    origin = view.created_at or 0
    rows = view.timeline[-limit:]
    for r in rows:
        label = r["node_id"] + (f"[{r['item']}]" if "item" in r else "") + (f" via {r['fallback']}" if "fallback" in r else "")
        t.add_row(str((r["started_at"] or r["finished_at"]) - origin), Text(label), str(r["attempt"] or "–"),
                  Text(r["worker"] or "–"), duration(r["duration_ms"]), status_text(r["outcome"]), Text(r["error"] or ""))
    return t


def node_view(view: RunView, node: NodeView) -> Group:
    """One node of a run: its state, then each attempt that ended, each with its traceback."""
    head = Text.assemble(("run ", "bold"), (view.run_id, "bold"), "  node ", (node.node_id, "bold"), "  ",
                         (node.uses, ""), "  ", status_text(node.status))
    parts: list[Any] = [head]
    if node.error:
        parts.append(Text("error: ", style="bold") + Text(node.error, style="red"))
    t = Table(title="attempts", title_justify="left", expand=False)
    for col in ("attempt", "worker", "started", "duration", "outcome"):
        t.add_column(col, no_wrap=True)
    t.add_column("error", overflow="fold")
    for a in node.history:
        label = str(a["attempt"] or "–") + (f" item {a['item']}" if "item" in a else "") \
            + (f" via {a['fallback']}" if "fallback" in a else "")
        t.add_row(Text(label), Text(a["worker"] or "–"), iso(a["started_at"]) or "–", duration(a["duration_ms"]),
                  status_text(a["outcome"]), Text(a["error"] or ""))
    parts.append(t if node.history else Text("no attempt has ended yet", style="dim"))
    for a in node.history:
        if a["traceback"]:
            parts.append(Text(f"\nattempt {a['attempt']} traceback:", style="bold"))
            parts.append(Text(a["traceback"].rstrip()))
    return Group(*parts)


def print_run(view: RunView) -> None:
    out.print(run_view(view))


def progress_line(node_id: str, status: str, detail: str = "") -> None:
    line = Text("  ") + Text(node_id, style="bold") + Text(" ") + status_text(status)
    if detail:
        line += Text(" " + detail, style="dim")
    err.print(line)


def transition_line(node_id: str | None, status: str, attempts: int, note: str | None, *, run_id: str = "") -> None:
    """One plain line of ``inspect --watch`` on a non-terminal: time, node (or the run), status, attempt, note."""
    what = f"run {run_id}" if node_id is None else f"node {node_id}"
    extra = f" attempt {attempts}" if attempts > 1 else ""
    tail = f": {note}" if note else ""
    sys.stdout.write(f"{_now()} {what} {status}{extra}{tail}\n")
    sys.stdout.flush()


def sweep_line(stats: Mapping[str, Any], runs: list[Mapping[str, Any]]) -> None:
    """One line per ``reconcile --interval`` sweep when stdout is not a terminal (a daemon's log)."""
    counts = " ".join(f"{k}={v}" for k, v in stats.items())
    stalled = ", ".join(r["run_id"] for r in runs)
    sys.stdout.write(f"{_now()} sweep {counts}" + (f" runs={stalled}" if stalled else "") + "\n")
    sys.stdout.flush()


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def warning(message: str) -> None:
    for line in message.splitlines() or [""]:
        sys.stderr.write(f"warning: {line}\n")
    sys.stderr.flush()


def info(message: str) -> None:
    err.print(Text(message, style="dim"))


def key_values(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    table = Table(title=title, title_justify="left", show_header=False, expand=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in rows:
        table.add_row(Text(k), Text(str(v)))
    out.print(table)


def age(ms: int | None) -> str:
    if ms is None:
        return "–"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    if ms < 3_600_000:
        return f"{ms // 60_000} min {ms % 60_000 // 1000} s"
    return f"{ms // 3_600_000} h {ms % 3_600_000 // 60_000} min"


def workers_table(queue: str, rows: Sequence[Mapping[str, Any]]) -> None:
    t = Table(title=f"workers on queue {queue}", title_justify="left")
    for col in ("worker", "status", "host", "pid", "concurrency", "running", "blueprints", "last heartbeat"):
        t.add_column(col, overflow="fold", no_wrap=col not in ("worker", "blueprints"))
    for r in rows:
        bps = ", ".join(f"{k}@{v}" for k, v in sorted(r["blueprints"].items())) or "–"
        t.add_row(Text(r["worker_id"]), status_text(r["status"]), Text(str(r["host"] or "–")), str(r["pid"] or "–"),
                  str(r["concurrency"] or "–"), str(r["steps_running"] if r["steps_running"] is not None else "–"),
                  Text(bps), age(r["heartbeat_age_ms"]) + " ago")
    out.print(t)
    if not rows:
        info(f"no live worker on queue {queue!r}")


def queue_table(counts: Mapping[str, Any]) -> None:
    key_values(f"queue {counts['queue']}", [
        ("ready", counts["ready"]), ("deferred", counts["deferred"]), ("in progress", counts["in_progress"]),
        ("oldest ready", age(counts["oldest_ready_age_ms"]) if counts["oldest_ready_age_ms"] is not None else "–"),
    ])


def stats_table(stats: Mapping[str, Any], runs: list[Mapping[str, Any]]) -> None:
    key_values("reconcile", stats.items())
    if runs:
        t = Table(title="stalled runs", title_justify="left")
        for col in ("run", "blueprint", "idle", "enqueued", "error"):
            t.add_column(col, overflow="fold")
        for r in runs:
            why = r.get("error") or (f"skipped: {r['skipped']}" if r.get("skipped") else "")
            t.add_row(Text(r["run_id"]), Text(str(r.get("blueprint_id") or "")), f"{r['idle_seconds']:.0f} s",
                      Text(", ".join(r.get("nodes") or []) or str(r.get("enqueued", 0))), Text(why))
        out.print(t)


def runs_table(queue: str, runs: list[Mapping[str, Any]]) -> None:
    """``flowcraft runs``: one row per run (``RunSummary.to_json``), newest first."""
    t = Table(title=f"runs on queue {queue}", title_justify="left", expand=False)
    for col in ("run", "blueprint", "status", "started", "duration", "failed node"):
        t.add_column(col, overflow="fold", no_wrap=col in ("status", "started", "duration"))
    for r in runs:
        started = (r["started_at"] or "–").replace("T", " ").rstrip("Z")
        t.add_row(Text(r["run_id"]), Text(r["blueprint_id"]), status_text(r["status"]), started,
                  duration(r["duration_ms"]), Text(r["failed_node"] or ""))
    out.print(t)
    if not runs:
        info("no runs")


