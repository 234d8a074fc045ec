"""Everything a command needs from the user's project: settings, the node registry, the blueprints,
and (for distributed commands) a checked Redis connection and an ArqAdapter."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Settings, load_settings, redact_url
from .errors import BlueprintError, ConfigError, InvalidInput, RedisUnavailable, json_type

if TYPE_CHECKING:  # the loader and the registry are imported by load_project only: views need neither
    from .blueprint import Blueprint
    from .distributed.adapter import ArqAdapter
    from .registry import NodeRegistry


@dataclass
class Project:
    settings: Settings
    registry: NodeRegistry
    blueprints: dict[str, Blueprint]
    #: problems in blueprint files the command does not need (``load_project(only=...)``): warnings
    problems: list[str] = field(default_factory=list)

    def blueprint(self, blueprint_id: str) -> Blueprint:
        bp = self.blueprints.get(blueprint_id)
        if bp is None:
            import difflib

            close = difflib.get_close_matches(blueprint_id, list(self.blueprints), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(self.blueprints)) or "none (check `blueprints:` in your config)"
            raise InvalidInput(f"unknown blueprint id {blueprint_id!r} ({hint}known: {known})")
        return bp


def load_project(config: str | None = None, overrides: Mapping[str, Any] | None = None, *,
                 only: str | None = None) -> Project:
    """``only``: the command runs this one blueprint, so a broken file elsewhere is a warning
    (``Project.problems``), not an error, unless this blueprint or a subflow it calls is what is broken."""
    from .loading import load_blueprints, load_blueprints_lenient
    from .registry import load_registry

    settings = load_settings(config, overrides=overrides)
    if settings.config_file is None and not any(Path(p).exists() for p in settings.blueprints):
        raise InvalidInput(
            f"no flowcraft.yaml in {Path.cwd()} and no blueprints at {', '.join(settings.blueprints)}: run from your "
            "project folder, or pass --config (or set FLOWCRAFT_CONFIG / FLOWCRAFT_BLUEPRINTS)")
    if settings.config_file:
        # the config file's folder is importable too, so `--config elsewhere/flowcraft.yaml` finds its nodes
        import sys

        folder = str(Path(settings.config_file).resolve().parent)
        if folder not in sys.path:
            sys.path.append(folder)
    registry = load_registry(settings.registry)
    if only is None:
        return Project(settings, registry, load_blueprints(settings.blueprints, registry))
    blueprints, problems, broken = load_blueprints_lenient(settings.blueprints, registry)
    if problems:
        needed, todo = set(), [only]
        while todo:
            bid = todo.pop()
            if bid in broken:
                raise BlueprintError(problems)
            if bid in needed or bid not in blueprints:
                continue
            needed.add(bid)
            todo += [str(n.params.get("blueprintId")) for n in blueprints[bid].nodes if n.uses == "subflow"]
    return Project(settings, registry, blueprints, problems)


def parse_input(text: str | None, file: str | None, *, what: str = "--input") -> dict[str, Any]:
    """A run input: a JSON object, from ``--input`` or ``--input-file``."""
    if text is not None and file is not None:
        raise InvalidInput("give either --input or --input-file, not both")
    if file is not None:
        what = f"--input-file {file}"
        try:
            text = Path(file).read_text()
        except OSError as e:
            raise InvalidInput(f"{what}: cannot read: {e.strerror}") from None
    if text is None:
        return {}
    value = parse_json(text, what)
    if not isinstance(value, dict):
        raise InvalidInput(f"{what}: must be a JSON object, got {json_type(value)} {text.strip()[:60]!r}")
    return value


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{what}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


async def connect_redis(url: str) -> Any:
    """A redis.asyncio client that has answered PING, or RedisUnavailable naming the redacted URL."""
    from redis.asyncio import Redis
    from redis.exceptions import AuthenticationError, RedisError

    try:
        client = Redis.from_url(url, socket_connect_timeout=3, health_check_interval=10)
    except ValueError as e:
        raise InvalidInput(f"redis.url: {redact_url(url)!r} is not a valid Redis URL: {e}") from None
    try:
        await client.ping()
    except AuthenticationError as e:
        await client.aclose()
        raise RedisUnavailable(f"Redis at {redact_url(url)} refused the credentials: {str(e).rstrip('.')}") from None
    except (RedisError, OSError) as e:
        await client.aclose()
        if "DB index is out of range" in str(e):  # it answered: the server is there, the database is not
            db = client.connection_pool.connection_kwargs.get("db", "?")
            raise ConfigError(f"redis.url: database index {db} is out of range for the Redis server at "
                              f"{redact_url(url)} (its `databases` setting, 16 by default, bounds it)") from None
        raise RedisUnavailable(f"cannot reach Redis at {redact_url(url)}: {str(e).rstrip('.')}; "
                               "is redis-server running?") from None
    return client


@asynccontextmanager
async def connected(project: Project, **kw: Any) -> AsyncIterator[ArqAdapter]:
    """An ArqAdapter on a checked connection, closed (queue pool and client) on the way out."""
    adapter = await open_adapter(project, **kw)
    try:
        yield adapter
    finally:
        await adapter.close()
        await adapter.redis.aclose()


async def open_adapter(project: Project, **kw: Any) -> ArqAdapter:
    from .distributed.adapter import ArqAdapter

    s = project.settings
    redis = await connect_redis(s.redis.url)
    return ArqAdapter(
        connection=redis, queue_name=s.queue.name,
        runtime_options={"registry": project.registry, "blueprints": project.blueprints},
        concurrency=s.worker.concurrency, job_timeout_s=s.worker.job_timeout_seconds,
        lease_s=s.worker.lease_seconds,
        ttl_s=s.state.ttl_seconds, running_ttl_s=s.state.running_ttl_seconds,
        version_grace_s=s.worker.version_grace_seconds, shutdown_wait_s=s.worker.shutdown_wait_seconds,
        poll_delay_s=s.worker.poll_delay_seconds, **kw,
    )
