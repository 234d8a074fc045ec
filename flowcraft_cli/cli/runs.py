"""``flowcraft runs``: a queue's runs, newest first, from its run index (CONTRACT §10). Needs only Redis."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from . import render
else:
    from .output import render  # rich is imported on the first table, not for --json or an error

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="Config file (default: $FLOWCRAFT_CONFIG, else ./flowcraft.yaml).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout and nothing else.")]


def runs(
    status: Annotated[str | None, typer.Option("--status", help="Only runs with this status: running, awaiting, completed, failed or cancelled.")] = None,
    blueprint_id: Annotated[str | None, typer.Option("--blueprint", help="Only runs of this blueprint id.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only runs started within this long: 90s, 15m, 2h, 7d, 1w.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many runs.")] = 20,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List the queue's runs, newest first: id, blueprint, status, start, duration, failed node."""
    from ..distributed.views import parse_since
    from ..remote import open_reader

    since_ms = parse_since(since) if since is not None else None

    async def go() -> None:
        async with open_reader(config) as reader:
            found = await reader.list_runs(status=status, blueprint_id=blueprint_id, since_ms=since_ms,
                                           limit=limit)
            now = int(time.time() * 1000)
            if json_out:
                render.print_json({"queue": reader.queue_name, "runs": [r.to_json(now) for r in found]})
            else:
                render.runs_table(reader.queue_name, [r.to_json(now) for r in found])

    asyncio.run(go())


def migrate(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count the runs to move; change nothing.")] = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Move runs started by an earlier version (node records, joins and events in keys of their own) into
    this version's layout, one run at a time. Stop the earlier version's workers first."""
    from ..distributed.migrate import migrate as move_runs
    from ..remote import open_reader

    async def go() -> None:
        async with open_reader(config) as reader:
            done = await move_runs(reader.redis, dry_run=dry_run)
            if json_out:
                render.print_json({**done.to_json(), "dry_run": dry_run})
            else:
                verb = "would move" if dry_run else "moved"
                typer.echo(f"{verb} {len(done.runs)} run(s) of the earlier layout ({done.fields} fields and events)"
                           + (f"; {len(done.gone)} expired run(s) left to expire" if done.gone else ""))

    asyncio.run(go())
