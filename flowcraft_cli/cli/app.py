"""``flowcraft`` commands. Each one parses flags, calls the library, and hands results to ``render``.
A FlowcraftError becomes one ``error: ...`` line and its exit code (CONTRACT §8)."""

from __future__ import annotations

import asyncio
import gc
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
from .logs import LogFormat, setup_logging
from .runs import migrate as migrate_command
from .runs import runs as runs_command

_CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, context_settings=_CONTEXT,
                  help="Run Flowcraft workflow blueprints in-process or across many machines (arq + Redis).")
worker_app = typer.Typer(no_args_is_help=True, context_settings=_CONTEXT,
                         help="Run a worker that executes node steps from the queue.")
app.add_typer(worker_app, name="worker")


def _flags_take_no_value() -> None:
    """typer's rich help prints ``<bool>`` after every flag (``--json <bool>``), as if it took a value; a flag
    takes none, so its type column stays empty."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("flowcraft-cli")
        except PackageNotFoundError:  # run from a checkout that was never installed
            v = "unknown"
        sys.stdout.write(f"flowcraft {v}\n")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Run Flowcraft workflow blueprints in-process or across many machines (arq + Redis)."""

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="Config file (default: $FLOWCRAFT_CONFIG, else ./flowcraft.yaml).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout and nothing else.")]
InputOpt = Annotated[str | None, typer.Option("--input", "-i", help="Run input: a JSON object (default: {}).")]
InputFileOpt = Annotated[str | None, typer.Option("--input-file", help="Read the run input (a JSON object) from a file.")]
RunIdArg = Annotated[str, typer.Argument(metavar="RUN_ID", help="The run's id, as `enqueue` printed it.")]

EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report a SIGINT
RESTING = {"completed", "failed", "cancelled", "awaiting"}


LogFormatOpt = Annotated[LogFormat, typer.Option("--log-format", help="text, or json: every log line one JSON object.")]


def _setup_logging(verbose: bool = False, log_format: LogFormat = LogFormat.TEXT) -> None:
    setup_logging(logging.INFO if verbose else logging.WARNING, log_format)


def _exit_for(status: str) -> int:
    return 1 if status in ("failed", "cancelled") else 0


# ---------------------------------------------------------------- in-process


@app.command()
def run(
    blueprint_id: Annotated[str, typer.Argument(metavar="BLUEPRINT_ID", help="Id of the blueprint to run.")],
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
    project = load_project(config, only=blueprint_id)
    _warn_problems(project)
    project.blueprint(blueprint_id)
    _settle_heap()

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


def _settle_heap() -> None:
    """What is loaded by now (modules, the project's blueprints and nodes) lives as long as the process: moved
    out of the cyclic collector's way (gc.freeze), so that its full passes walk only what the work made since.
    A worker's full passes walked some 45,000 such objects each time: about 5 % of its CPU under load."""
    gc.collect()  # (garbage left by the loading is freed now, not kept for ever)
    gc.freeze()


@app.command()
def validate(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH", show_default=False,
                                                      help="Blueprint files or folders (default: from config).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Check blueprints (and the registry they use); every problem is listed, one per line."""
    from ..config import load_settings
    from ..loading import load_blueprints
    from ..registry import load_registry

    settings = load_settings(config)
    registry = load_registry(settings.registry)
    blueprints = load_blueprints(paths or settings.blueprints, registry)
    for bp in blueprints.values():
        render.out.print(f"ok  {bp.id}  ({len(bp.nodes)} nodes, {len(bp.edges)} edges, version {bp.version})  {bp.source}",
                         markup=False, highlight=False)
    render.info(f"{len(blueprints)} blueprint(s) valid")


@app.command()
def graph(blueprint_id: Annotated[str, typer.Argument(metavar="BLUEPRINT_ID", help="Id of the blueprint to draw.")],
          config: ConfigOpt = None) -> None:
    """Print a blueprint as a Mermaid flowchart."""
    from ..graph import render_mermaid
    from ..project import load_project

    bp = load_project(config).blueprint(blueprint_id)
    sys.stdout.write(render_mermaid(bp) + "\n")


# ---------------------------------------------------------------- distributed


@worker_app.command("start")
def worker_start(
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, help="Steps run at once (default: worker.concurrency, 10).")] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit when the queue is empty, including jobs scheduled for later (retry backoff, sleep).")] = False,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=1, max=65535, help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics.")] = None,
    log_format: LogFormatOpt = LogFormat.TEXT,
    config: ConfigOpt = None,
) -> None:
    """Validate everything, print a summary, then process jobs until SIGTERM/SIGINT."""
    from ..config import redact_url
    from ..project import connected, load_project

    _setup_logging(verbose=True, log_format=log_format)
    project = load_project(config, overrides={"worker.concurrency": concurrency})
    s = project.settings
    _settle_heap()

    async def go() -> None:
        async with connected(project) as adapter:
            if metrics_port is not None:
                from ..distributed.metrics import WorkerMetrics

                metrics = WorkerMetrics()
                metrics.attach(adapter)
                metrics.serve(adapter, metrics_port)
            render.key_values("flowcraft worker", [
                ("worker", adapter.worker_id), ("redis", redact_url(s.redis.url)), ("queue", s.queue.name),
                ("concurrency", s.worker.concurrency), ("job timeout", f"{s.worker.job_timeout_seconds} s" if s.worker.job_timeout_seconds else "none"),
                ("lease", f"{s.worker.lease_seconds} s"),
                ("blueprints", ", ".join(f"{b.id}@{b.version}" for b in project.blueprints.values()) or "none"),
                ("nodes", ", ".join(project.registry.names()) or "none"),
                *([("metrics", f"http://127.0.0.1:{metrics_port}/metrics")] if metrics_port is not None else []),
            ])
            render.out.file.flush()
            await adapter.start(burst=burst, install_signals=True)
        logging.getLogger("flowcraft.worker").info("worker stopped")  # a log line: JSON with --log-format json

    asyncio.run(go())


@app.command()
def enqueue(
    blueprint_id: Annotated[str, typer.Argument(metavar="BLUEPRINT_ID", help="Id of the blueprint to run.")],
    input: InputOpt = None,
    input_file: InputFileOpt = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Run id (default: random); an existing id is refused.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run until it rests (completed/failed/cancelled/awaiting).")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="With --wait: give up after S seconds (exit 124; default: wait for as long as it takes).")] = None,
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
    project = load_project(config, only=blueprint_id)
    _warn_problems(project)
    project.blueprint(blueprint_id)
    started: list[str] = []

    async def go() -> int:
        async with connected(project) as adapter:
            rid = await adapter.start_run(blueprint_id, run_input, run_id=run_id)
            started.append(rid)
            if not wait:
                if json_out:
                    render.print_json({"run_id": rid, "blueprint_id": blueprint_id, "status": "running"})
                else:
                    sys.stdout.write(rid + "\n")
                return 0
            if not json_out:
                render.info(f"run {rid} started; waiting")
            view = await _until_interrupted(_follow(adapter, rid, timeout, quiet=json_out))
            if view is None:
                if json_out:  # still one document: the run as it stands
                    render.print_json((await adapter.inspect(rid)).to_json())
                render.error(f"run {rid} did not rest within {timeout:g} s; it goes on (flowcraft inspect {rid})")
                return EXIT_TIMEOUT
            if json_out:
                render.print_json(view.to_json())
            else:
                render.print_run(view)
            return _exit_for(view.status)

    try:
        code = asyncio.run(go())
    except KeyboardInterrupt:
        if started and wait:
            render.info(f"interrupted; run {started[0]} goes on: follow it with `flowcraft inspect {started[0]} --watch`")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


def _run_interruptible(coro: Any) -> Any:
    """asyncio.run for a command that may wait long (``--watch``): Ctrl-C exits 130, quietly."""
    try:
        return asyncio.run(_until_interrupted(coro))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


async def _until_interrupted(coro: Any) -> Any:
    """Await ``coro``; Ctrl-C ends it with KeyboardInterrupt. The SIGINT handler runs as an event-loop
    callback: asyncio.run's own handler cancels the task from inside a signal handler, between any two
    bytecodes, and on Python 3.11 such a cancel can be lost (the process then hangs in a sleep)."""
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    interrupted: list[bool] = []

    def on_sigint() -> None:
        interrupted.append(True)
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await task
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _warn_problems(project: Any) -> None:
    """A broken blueprint file the command does not need: said on stderr, and the command goes on."""
    for problem in project.problems:
        render.warning(f"{problem} (ignored: not needed by this command; `flowcraft validate` lists every problem)")


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
    run_id: RunIdArg,
    node_id: Annotated[str | None, typer.Option("--node", help="Show one node: its attempts, with their tracebacks.")] = None,
    json_out: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the run until it rests: a live table on a terminal, "
                                        "else one line per node change; with --json one document per change (JSON Lines).")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show a run: summary, node table (status, attempts, duration, error) and context."""
    from ..remote import open_reader

    _setup_logging()
    check_run_ref(run_id)

    def document(view: Any) -> dict[str, Any]:
        return _node_of(view, node_id).to_json() if node_id is not None else view.to_json()

    def show(view: Any) -> Any:
        return render.node_view(view, _node_of(view, node_id)) if node_id is not None else render.run_view(view)

    async def go() -> int:
        async with open_reader(config) as adapter:
            view = await adapter.inspect(run_id)
            document(view)  # an unknown --node is refused before anything is printed
            if watch and json_out:
                last = None
                while True:
                    doc = document(view)
                    if doc != last:
                        render.print_json(doc, compact=True)
                        last = doc
                    if view.status in RESTING:
                        break
                    await asyncio.sleep(0.5)
                    view = await adapter.inspect(run_id)
            elif watch and not sys.stdout.isatty():
                await _watch_lines(adapter, view, node_id)
            elif watch:
                from rich.live import Live

                with Live(show(view), console=render.out, refresh_per_second=4) as live:
                    while view.status not in RESTING:
                        await asyncio.sleep(0.5)
                        view = await adapter.inspect(run_id)
                        live.update(show(view))
            elif json_out:
                render.print_json(document(view))
            else:
                render.out.print(show(view))
            return 0

    raise typer.Exit(_run_interruptible(go()))


def _node_of(view: Any, node_id: str) -> Any:
    for n in view.nodes:
        if n.node_id == node_id:
            return n
    raise InvalidInput(f"run {view.run_id!r} has no node {node_id!r} (nodes: {', '.join(n.node_id for n in view.nodes)})")


async def _watch_lines(adapter: Any, view: Any, node_id: str | None) -> None:
    """``--watch`` to a pipe or a file: one line per node transition, then one for the run's resting status;
    a log, not a redrawn screen."""
    seen: dict[str, tuple[str, int]] = {}
    while True:
        for n in view.nodes:
            state = (n.status, n.attempts)
            if (node_id is None or n.node_id == node_id) and seen.get(n.node_id, ("pending", 0)) != state:
                seen[n.node_id] = state
                render.transition_line(n.node_id, n.status, n.attempts, n.error)
        if view.status in RESTING:
            render.transition_line(None, view.status, 0, view.reason, run_id=view.run_id)
            return
        await asyncio.sleep(0.5)
        view = await adapter.inspect(view.run_id, timeline=False)


@app.command()
def resume(
    run_id: RunIdArg,
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
def cancel(run_id: RunIdArg, config: ConfigOpt = None) -> None:
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
def retry(
    run_id: Annotated[str, typer.Argument(help="Id of a failed run.")],
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run a failed run on from where it failed: its failed nodes (and what their failure kept from running)
    run again under the same run id with fresh attempts; completed nodes keep their outputs."""
    from ..project import connected, load_project

    _setup_logging()
    check_run_ref(run_id)
    project = load_project(config)

    async def go() -> Any:
        async with connected(project) as adapter:
            await adapter.retry(run_id)
            return await adapter.inspect(run_id, timeline=False)

    view = asyncio.run(go())
    again = [n.node_id for n in view.nodes if n.status == "queued"]
    if json_out:
        render.print_json({"run_id": run_id, "status": view.status, "queued": again})
    else:
        render.info(f"run {run_id} retried: {', '.join(again) or 'nothing'} queued again; "
                    f"follow it with: flowcraft inspect {run_id} --watch")


@app.command()
def reconcile(
    threshold: Annotated[float | None, typer.Option("--threshold", min=0, help="Seconds without progress before a run counts as stalled (default: reconciler.threshold_seconds, 300).")] = None,
    scan_count: Annotated[int | None, typer.Option("--scan-count", min=1, help="SCAN page size (default: reconciler.scan_count, 100).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be queued; change nothing.")] = False,
    interval: Annotated[float | None, typer.Option("--interval", min=0.1, help="Sweep every S seconds until SIGTERM/SIGINT (default: one sweep).")] = None,
    json_out: JsonOpt = False,
    log_format: LogFormatOpt = LogFormat.TEXT,
    config: ConfigOpt = None,
) -> None:
    """Find stalled runs and queue the steps they lost. Exit 1 when a run could not be reconciled."""
    import signal

    from redis.exceptions import RedisError

    from ..distributed.reconciler import create_arq_reconciler
    from ..remote import open_remote_adapter

    _setup_logging(log_format=log_format)
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
                elif interval is not None and not sys.stdout.isatty():  # a daemon's log: one line per sweep
                    render.sweep_line(stats.counts(), [vars(r) for r in stats.runs])
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


from . import fleet  # noqa: E402  (its commands are registered on `app`, defined above)

fleet.register(app)
app.command("runs")(runs_command)
app.command("migrate")(migrate_command)


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
