"""``flowcraft`` commands. Each one parses flags, calls the library, and hands results to ``render``.
A FlowcraftError becomes one ``error: ...`` line and its exit code (CONTRACT §8)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import FlowcraftError, InvalidInput, StateConflict
from ..ids import check_run_id, check_run_ref

if TYPE_CHECKING:
    from . import render
else:
    from .output import render  # rich is imported on the first table, not for --json or an error
from .runs import runs as runs_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Flowcraft workflow blueprints in-process or across many machines (arq + Redis).")
worker_app = typer.Typer(no_args_is_help=True, help="Run a worker that executes node steps from the queue.")
app.add_typer(worker_app, name="worker")

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="Config file (default: $FLOWCRAFT_CONFIG, else ./flowcraft.yaml).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout and nothing else.")]
InputOpt = Annotated[str | None, typer.Option("--input", "-i", help="Run input: a JSON object.")]
InputFileOpt = Annotated[str | None, typer.Option("--input-file", help="Read the run input (a JSON object) from a file.")]

EXIT_TIMEOUT = 124
RESTING = {"completed", "failed", "cancelled", "awaiting"}


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def _exit_for(status: str) -> int:
    return 1 if status in ("failed", "cancelled") else 0


# ---------------------------------------------------------------- in-process


@app.command()
def run(
    blueprint_id: Annotated[str, typer.Argument(help="Id of the blueprint to run.")],
    input: InputOpt = None,
    input_file: InputFileOpt = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Run id (default: random).")] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run a blueprint start to finish in this process (no Redis needed)."""
    from ..project import load_project, parse_input
    from ..runtime import FlowRuntime

    _setup_logging()
    run_input = parse_input(input, input_file)
    project = load_project(config)
    project.blueprint(blueprint_id)

    def on_event(kind: str, job: Any) -> None:
        if not json_out and kind == "start" and job.kind in ("exec", "fallback"):
            detail = f"attempt {job.attempt}" if job.attempt > 1 else ""
            if job.kind == "fallback":
                detail = "fallback " + detail
            render.progress_line(job.node_id, "running", detail.strip())

    async def go() -> Any:
        runtime = FlowRuntime(project.blueprints, project.registry, on_event=on_event)
        return await runtime.run(blueprint_id, run_input, run_id=run_id)

    result = asyncio.run(go())
    if json_out:
        render.print_json(result.to_json())
    else:
        render.print_run(result.view)
    raise typer.Exit(_exit_for(result.status))


@app.command()
def validate(
    paths: Annotated[list[str] | None, typer.Argument(help="Blueprint files or folders (default: from config).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Check blueprints (and the registry they use); every problem is listed, one per line."""
    from ..config import load_settings
    from ..loader import load_blueprints
    from ..registry import load_registry

    settings = load_settings(config)
    registry = load_registry(settings.registry)
    blueprints = load_blueprints(paths or settings.blueprints, registry)
    for bp in blueprints.values():
        render.out.print(f"ok  {bp.id}  ({len(bp.nodes)} nodes, {len(bp.edges)} edges, version {bp.version})  {bp.source}",
                         markup=False, highlight=False)
    render.info(f"{len(blueprints)} blueprint(s) valid")


@app.command()
def graph(blueprint_id: Annotated[str, typer.Argument()], config: ConfigOpt = None) -> None:
    """Print a blueprint as a Mermaid flowchart."""
    from ..graph import render_mermaid
    from ..project import load_project

    bp = load_project(config).blueprint(blueprint_id)
    sys.stdout.write(render_mermaid(bp) + "\n")


# ---------------------------------------------------------------- distributed


@worker_app.command("start")
def worker_start(
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, help="Steps run at once.")] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit when the queue is empty, including jobs scheduled for later (retry backoff, sleep).")] = False,
    config: ConfigOpt = None,
) -> None:
    """Validate everything, print a summary, then process jobs until SIGTERM/SIGINT."""
    from ..config import redact_url
    from ..project import connected, load_project

    _setup_logging(verbose=True)
    project = load_project(config, overrides={"worker.concurrency": concurrency})
    s = project.settings

    async def go() -> None:
        async with connected(project) as adapter:
            render.key_values("flowcraft worker", [
                ("worker", adapter.worker_id), ("redis", redact_url(s.redis.url)), ("queue", s.queue.name),
                ("concurrency", s.worker.concurrency), ("job timeout", f"{s.worker.job_timeout_seconds} s" if s.worker.job_timeout_seconds else "none"),
                ("lease", f"{s.worker.lease_seconds} s"),
                ("blueprints", ", ".join(f"{b.id}@{b.version}" for b in project.blueprints.values()) or "none"),
                ("nodes", ", ".join(project.registry.names()) or "none"),
            ])
            render.out.file.flush()
            await adapter.start(burst=burst, install_signals=True)
        render.info("worker stopped")

    asyncio.run(go())


@app.command()
def enqueue(
    blueprint_id: Annotated[str, typer.Argument()],
    input: InputOpt = None,
    input_file: InputFileOpt = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Run id (default: random); an existing id is refused.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run until it rests (completed/failed/cancelled/awaiting).")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="With --wait: give up after S seconds (exit 124).")] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Start a run on the workers; prints its run id."""
    from ..project import connected, load_project

    _setup_logging()
    if timeout is not None and not wait:
        raise InvalidInput("--timeout only applies with --wait")
    if run_id is not None:
        check_run_id(run_id)
    run_input = parse_input_checked(input, input_file)
    project = load_project(config)
    project.blueprint(blueprint_id)

    async def go() -> int:
        async with connected(project) as adapter:
            rid = await adapter.start_run(blueprint_id, run_input, run_id=run_id)
            if not wait:
                if json_out:
                    render.print_json({"run_id": rid, "blueprint_id": blueprint_id, "status": "running"})
                else:
                    sys.stdout.write(rid + "\n")
                return 0
            if not json_out:
                render.info(f"run {rid} started; waiting")
            view = await _follow(adapter, rid, timeout, quiet=json_out)
            if view is None:
                if json_out:  # still one document: the run as it stands
                    now = await adapter.inspect(rid)
                    render.print_json({"run_id": rid, "blueprint_id": now.blueprint_id, "status": now.status,
                                       "reason": now.reason, "context": now.context, "outputs": now.outputs})
                render.error(f"run {rid} did not rest within {timeout:g} s; it goes on (flowcraft inspect {rid})")
                return EXIT_TIMEOUT
            if json_out:
                render.print_json({"run_id": rid, "blueprint_id": view.blueprint_id, "status": view.status,
                                   "reason": view.reason, "context": view.context, "outputs": view.outputs})
            else:
                render.print_run(view)
            return _exit_for(view.status)

    raise typer.Exit(asyncio.run(go()))


def parse_input_checked(text: str | None, file: str | None) -> dict[str, Any]:
    from ..project import parse_input

    return parse_input(text, file)


async def _follow(adapter: Any, run_id: str, timeout: float | None, *, quiet: bool) -> Any:
    """Poll a run, printing node status changes to stderr, until it rests or the timeout passes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: dict[str, tuple[str, int]] = {}
    while True:
        view = await adapter.inspect(run_id, timeline=False)  # polled: statuses only, not the event log
        if not quiet:
            for n in view.nodes:
                state = (n.status, n.attempts)
                if seen.get(n.node_id) != state and n.status != "pending":
                    seen[n.node_id] = state
                    render.progress_line(n.node_id, n.status, f"attempt {n.attempts}" if n.attempts > 1 else "")
        if view.status in RESTING:
            return await adapter.inspect(run_id)  # the whole picture, attempt timeline included
        if deadline is not None and time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.2)


@app.command()
def inspect(
    run_id: Annotated[str, typer.Argument()],
    json_out: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until the run rests.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show a run: summary, node table (status, attempts, duration, error) and context."""
    from ..remote import open_reader

    _setup_logging()
    check_run_ref(run_id)

    async def go() -> int:
        async with open_reader(config) as adapter:
            view = await adapter.inspect(run_id)
            if watch and not json_out:
                from rich.live import Live

                with Live(render.run_view(view), console=render.out, refresh_per_second=4) as live:
                    while view.status not in RESTING:
                        await asyncio.sleep(0.5)
                        view = await adapter.inspect(run_id)
                        live.update(render.run_view(view))
            elif json_out:
                render.print_json(view.to_json())
            else:
                render.print_run(view)
            return 0

    raise typer.Exit(asyncio.run(go()))


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument()],
    action: Annotated[str, typer.Option("--action", help="Action that routes the awaiting node's edges.")],
    node_id: Annotated[str | None, typer.Option("--node", help="Which awaiting node (needed when several wait).")] = None,
    output: Annotated[str | None, typer.Option("--output", help="The node's output, as JSON.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Give an awaiting `wait` node its output and action; the run continues on the workers."""
    from ..project import connected, load_project, parse_json

    _setup_logging()
    check_run_ref(run_id)
    value = parse_json(output, "--output") if output is not None else None
    project = load_project(config)

    async def go() -> None:
        async with connected(project) as adapter:
            await adapter.resume(run_id, node_id, output=value, action=action)

    asyncio.run(go())
    render.info(f"run {run_id} resumed with action {action!r}")


@app.command()
def cancel(run_id: Annotated[str, typer.Argument()], config: ConfigOpt = None) -> None:
    """Cancel a run: its status becomes cancelled and no further node of it starts."""
    from ..remote import open_remote_adapter

    _setup_logging()
    check_run_ref(run_id)

    async def go() -> None:
        async with open_remote_adapter(config) as (adapter, _):
            if not await adapter.cancel(run_id):
                status = (await adapter.status(run_id) or {}).get("status", "finished")
                raise StateConflict(f"run {run_id!r} is {status}; nothing to cancel")

    asyncio.run(go())
    render.info(f"run {run_id} cancelled")


@app.command()
def reconcile(
    threshold: Annotated[float | None, typer.Option("--threshold", min=0, help="Seconds without progress before a run counts as stalled.")] = None,
    scan_count: Annotated[int | None, typer.Option("--scan-count", min=1, help="SCAN page size.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be queued; change nothing.")] = False,
    interval: Annotated[float | None, typer.Option("--interval", min=0.1, help="Sweep every S seconds until SIGTERM/SIGINT.")] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Find stalled runs and queue the steps they lost. Exit 1 when a run could not be reconciled."""
    import signal

    from redis.exceptions import RedisError

    from ..distributed.reconciler import create_arq_reconciler
    from ..remote import open_remote_adapter

    _setup_logging()
    overrides = {"reconciler.threshold_seconds": threshold, "reconciler.scan_count": scan_count}

    async def go() -> int:
        stop = asyncio.Event()
        if interval is not None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        failed = 0
        async with open_remote_adapter(config, overrides) as (adapter, s):
            reconciler = create_arq_reconciler(adapter=adapter, redis=adapter.redis,
                                               stalled_threshold_seconds=s.reconciler.threshold_seconds,
                                               scan_count=s.reconciler.scan_count, dry_run=dry_run)
            while True:
                try:
                    stats = await reconciler.run()
                except (RedisError, OSError) as e:
                    if interval is None:
                        raise
                    # a daemon outlives a Redis restart: report the failed sweep and try again next time
                    render.error(f"sweep failed: lost Redis: {type(e).__name__}: {e}")
                    failed += 1
                    try:
                        await asyncio.wait_for(stop.wait(), interval)
                        break
                    except TimeoutError:
                        continue
                failed += stats.failed_runs
                if json_out:  # with --interval: one line per sweep (JSON Lines)
                    render.print_json(stats.to_json(), compact=interval is not None)
                else:
                    render.stats_table(stats.counts(), [vars(r) for r in stats.runs])
                if interval is None:
                    break
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                    break
                except TimeoutError:
                    continue
        return 1 if failed else 0

    raise typer.Exit(asyncio.run(go()))


app.command("runs")(runs_command)


def main() -> None:
    # typer's standalone mode turns usage errors into its own message and exit 2; our errors become one line
    try:
        app(prog_name="flowcraft")
    except FlowcraftError as e:
        render.error(str(e))
        sys.exit(e.exit_code)
    except Exception as e:
        # Redis went away mid-command (the URL was checked at connect). redis.exceptions is looked up, not
        # imported: a command that never loaded redis cannot have raised its errors, and --help stays fast
        redis_errors = sys.modules.get("redis.exceptions")
        if not isinstance(e, ConnectionError) and (redis_errors is None or not isinstance(e, redis_errors.RedisError)):
            raise
        render.error(f"lost Redis: {type(e).__name__}: {str(e).rstrip('.')}")
        sys.exit(1)
