"""Settings and ``load_settings``: defaults < config file < environment < command-line flags (CONTRACT §2).

Every key is declared once in ``_FIELDS`` (dotted name, default, check); the dataclasses below give attribute
access (``settings.worker.concurrency``). Problems are collected and raised as one ConfigError, each line
``ORIGIN: key.path: message``, where ORIGIN is the config file, ``$FLOWCRAFT_...`` or ``command line``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ENV_VARS",
    "QueueSettings",
    "ReconcilerSettings",
    "RedisSettings",
    "Settings",
    "StateSettings",
    "WorkerSettings",
    "load_settings",
    "redact_url",
]

DEFAULT_CONFIG_FILE = "flowcraft.yaml"

#: environment variable -> setting it overrides
ENV_VARS = {
    "FLOWCRAFT_REDIS_URL": "redis.url",
    "FLOWCRAFT_QUEUE": "queue.name",
    "FLOWCRAFT_BLUEPRINTS": "blueprints",
    "FLOWCRAFT_REGISTRY": "registry",
}


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = "redis://localhost:6379/0"


@dataclass(frozen=True, slots=True)
class QueueSettings:
    name: str = "flowcraft-queue"


@dataclass(frozen=True, slots=True)
class StateSettings:
    ttl_seconds: int = 86400  # a finished run's keys; 0 = forever
    running_ttl_seconds: int = 604800  # an unfinished run's keys, after its last progress; 0 = forever


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    concurrency: int = 10
    job_timeout_seconds: float = 300  # an attempt's limit when its node sets no timeout; 0 = none
    lease_seconds: float = 15  # a running step's claim lapses this long after its worker's last heartbeat
    version_grace_seconds: float = 300
    shutdown_wait_seconds: float = 10  # on SIGTERM/SIGINT: time for in-flight steps before they are handed back
    poll_delay_seconds: float = 0.02  # how often a --burst worker polls; a long-running one is woken instead


@dataclass(frozen=True, slots=True)
class ReconcilerSettings:
    threshold_seconds: float = 300
    scan_count: int = 100


@dataclass(frozen=True, slots=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    blueprints: tuple[str, ...] = ("./blueprints",)
    registry: tuple[str, ...] = ()
    state: StateSettings = field(default_factory=StateSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    reconciler: ReconcilerSettings = field(default_factory=ReconcilerSettings)
    #: the config file that was read, if any (not a setting)
    config_file: str | None = field(default=None, compare=False)

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """The settings as plain data (for ``--json`` and summaries); the Redis password is masked."""
        return {
            "redis": {"url": redact_url(self.redis.url) if redact else self.redis.url},
            "queue": {"name": self.queue.name},
            "blueprints": list(self.blueprints),
            "registry": list(self.registry),
            "state": {
                "ttl_seconds": self.state.ttl_seconds,
                "running_ttl_seconds": self.state.running_ttl_seconds,
            },
            "worker": {
                "concurrency": self.worker.concurrency,
                "job_timeout_seconds": self.worker.job_timeout_seconds,
                "lease_seconds": self.worker.lease_seconds,
                "version_grace_seconds": self.worker.version_grace_seconds,
                "shutdown_wait_seconds": self.worker.shutdown_wait_seconds,
                "poll_delay_seconds": self.worker.poll_delay_seconds,
            },
            "reconciler": {
                "threshold_seconds": self.reconciler.threshold_seconds,
                "scan_count": self.reconciler.scan_count,
            },
        }


# --------------------------------------------------------------------------------------------- checks
# A check takes (value, coerce_strings) and returns the clean value or raises ValueError(message).

_Check = Callable[[Any, bool], Any]
_MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(minimum: int, note: str = "") -> _Check:
    def check(value: Any, coerce: bool) -> int:
        if coerce and isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        raise ValueError(f"must be an integer >= {minimum}{note}, got {_show(value)}")

    return check


def _seconds(minimum: float, *, strict: bool = False) -> _Check:
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"

    def check(value: Any, coerce: bool) -> int | float:
        if coerce and isinstance(value, str):
            try:
                value = float(value) if "." in value else int(value)
            except ValueError:
                pass
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > minimum if strict else value >= minimum)
        )
        if ok:
            return value
        raise ValueError(f"must be a number of seconds {bound}, got {_show(value)}")

    return check


def _redis_url(value: Any, coerce: bool) -> str:
    if isinstance(value, str) and value.startswith(_URL_SCHEMES) and value.partition("://")[2]:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(value)
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        db = db or (parse_qs(parts.query).get("db") or [""])[0]
        if db and not db.isdigit():
            raise ValueError(f"the database in {_show(redact_url(value))} must be a number, got {db!r}")
        return value
    shown = _show(redact_url(value)) if isinstance(value, str) else _show(value)
    raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got {shown}")


def _queue_name(value: Any, coerce: bool) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(f"must be a non-empty string, got {_show(value)}")


def _string_list(what: str, item_ok: Callable[[str], bool], item_hint: str) -> _Check:
    def check(value: Any, coerce: bool) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"must be a list of {what}, got {_show(value)}")
        bad = [v for v in value if not isinstance(v, str) or not item_ok(v)]
        if bad:
            raise ValueError(f"must be a list of {what}; {_show(bad[0])} is not {item_hint}")
        return tuple(value)

    return check


@dataclass(frozen=True, slots=True)
class _Field:
    default: Any
    check: _Check


_D = Settings()
_FIELDS: dict[str, _Field] = {
    "redis.url": _Field(_D.redis.url, _redis_url),
    "queue.name": _Field(_D.queue.name, _queue_name),
    "blueprints": _Field(_D.blueprints, _string_list("paths", lambda v: bool(v.strip()), "a path")),
    "registry": _Field(
        _D.registry,
        _string_list("module names", lambda v: bool(_MODULE_RE.match(v)), "a module name like 'myapp.nodes'"),
    ),
    "state.ttl_seconds": _Field(_D.state.ttl_seconds, _integer(0, " (0 = forever)")),
    "state.running_ttl_seconds": _Field(_D.state.running_ttl_seconds, _integer(0, " (0 = forever)")),
    "worker.concurrency": _Field(_D.worker.concurrency, _integer(1)),
    "worker.job_timeout_seconds": _Field(_D.worker.job_timeout_seconds, _seconds(0)),
    "worker.lease_seconds": _Field(_D.worker.lease_seconds, _seconds(0, strict=True)),
    "worker.version_grace_seconds": _Field(_D.worker.version_grace_seconds, _seconds(0)),
    "worker.shutdown_wait_seconds": _Field(_D.worker.shutdown_wait_seconds, _seconds(0)),
    "worker.poll_delay_seconds": _Field(_D.worker.poll_delay_seconds, _seconds(0, strict=True)),
    "reconciler.threshold_seconds": _Field(_D.reconciler.threshold_seconds, _seconds(0)),
    "reconciler.scan_count": _Field(_D.reconciler.scan_count, _integer(1)),
}
_SECTIONS: dict[str, list[str]] = {}
for _name in _FIELDS:
    if "." in _name:
        _section, _key = _name.split(".", 1)
        _SECTIONS.setdefault(_section, []).append(_key)
_TOP_LEVEL = [n for n in _FIELDS if "." not in n] + list(_SECTIONS)
_PATH_KEYS = frozenset({"blueprints"})


def _did_you_mean(word: Any, candidates: list[str]) -> str:
    if not isinstance(word, str):
        return ""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (userinfo and a ``password=`` query parameter)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    location, qmark, query = rest.partition("?")
    userinfo, at, hostpart = location.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        location = f"{user}:***@{hostpart}"
    if qmark:
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", query)
    return f"{scheme}://{location}{qmark}{query}"


# --------------------------------------------------------------------------------------------- loading


def _resolve_path(path: str, base: str | None) -> str:
    path = os.path.expanduser(path)
    if not base or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base, path))


class _Layers:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {name: f.default for name, f in _FIELDS.items()}
        self.problems: list[str] = []

    def set(self, origin: str, name: str, value: Any, *, coerce: bool, base: str | None) -> None:
        try:
            clean = _FIELDS[name].check(value, coerce)
        except ValueError as e:
            self.problems.append(f"{origin}: {name}: {e}")
            return
        if name in _PATH_KEYS:
            clean = tuple(_resolve_path(p, base) for p in clean)
        self.values[name] = clean

    def apply_file(self, origin: str, doc: Any, base: str) -> None:
        if doc is None:
            return
        if not isinstance(doc, Mapping):
            self.problems.append(f"{origin}: top level: must be a mapping of settings, got {_show(doc)}")
            return
        for key, value in doc.items():
            if key in _SECTIONS:
                if value is None:
                    continue
                if not isinstance(value, Mapping):
                    keys = ", ".join(_SECTIONS[key])
                    self.problems.append(
                        f"{origin}: {key}: must be a mapping (keys: {keys}), got {_show(value)}"
                    )
                    continue
                for sub, subvalue in value.items():
                    if sub not in _SECTIONS[key]:
                        self.problems.append(
                            f"{origin}: {key}.{sub}: unknown key{_did_you_mean(sub, _SECTIONS[key])}; "
                            f"allowed: {', '.join(_SECTIONS[key])}"
                        )
                    else:
                        self.set(origin, f"{key}.{sub}", subvalue, coerce=False, base=base)
            elif key in _FIELDS:
                self.set(origin, key, value, coerce=False, base=base)
            else:
                self.problems.append(
                    f"{origin}: {key}: unknown key{_did_you_mean(key, _TOP_LEVEL)}; allowed: {', '.join(_TOP_LEVEL)}"
                )


def _read_config_file(path: str, shown: str) -> Any:
    from .loading.decode import decode_yaml  # yaml is only needed when a file is read

    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown}: not UTF-8 text ({e.reason})") from None
    doc, problems = decode_yaml(text, shown)
    if problems:
        raise ConfigError("\n".join(problems))
    return doc


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    cwd: str | None = None,
) -> Settings:
    """Build Settings from defaults < config file < environment < ``overrides`` (dotted keys, e.g.
    ``{"worker.concurrency": 4}``; ``None`` values are ignored, so unset CLI flags can be passed as is).

    The config file is ``config_path``, else ``$FLOWCRAFT_CONFIG``, else ``flowcraft.yaml`` in ``cwd`` when
    present; a named file that does not exist is an error. Relative blueprint paths resolve against the config
    file's folder when they come from the file, else against ``cwd`` (kept as given when ``cwd`` is None).
    """
    env = os.environ if env is None else env
    layers = _Layers()
    for name, f in _FIELDS.items():
        if name in _PATH_KEYS:
            layers.values[name] = tuple(_resolve_path(p, cwd) for p in f.default)

    config_file: str | None = None
    named_by = None
    if config_path is not None:
        config_file, named_by = os.fspath(config_path), "--config"
    elif env.get("FLOWCRAFT_CONFIG"):
        config_file, named_by = env["FLOWCRAFT_CONFIG"], "$FLOWCRAFT_CONFIG"
    else:
        candidate = os.path.join(cwd, DEFAULT_CONFIG_FILE) if cwd else DEFAULT_CONFIG_FILE
        if os.path.isfile(candidate):
            config_file = candidate
    if config_file is not None:
        real = _resolve_path(config_file, cwd)
        if not os.path.exists(real):
            raise ConfigError(f"{config_file}: config file not found (named by {named_by})")
        doc = _read_config_file(real, config_file)
        layers.apply_file(config_file, doc, os.path.dirname(real))

    for var, name in ENV_VARS.items():
        raw = env.get(var)
        if not raw:
            continue
        value: Any = raw
        if name == "blueprints":
            value = [p for p in raw.split(os.pathsep) if p.strip()]
        elif name == "registry":
            value = [m.strip() for m in raw.split(",") if m.strip()]
        layers.set(f"${var}", name, value, coerce=True, base=cwd)

    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            layers.problems.append(
                f"command line: {name}: unknown setting{_did_you_mean(name, list(_FIELDS))}"
            )
            continue
        if value is None:
            continue
        layers.set("command line", name, value, coerce=True, base=cwd)

    if layers.problems:
        raise ConfigError("\n".join(layers.problems))
    v = layers.values
    return Settings(
        redis=RedisSettings(url=v["redis.url"]),
        queue=QueueSettings(name=v["queue.name"]),
        blueprints=v["blueprints"],
        registry=v["registry"],
        state=StateSettings(
            ttl_seconds=v["state.ttl_seconds"], running_ttl_seconds=v["state.running_ttl_seconds"]
        ),
        worker=WorkerSettings(
            concurrency=v["worker.concurrency"],
            job_timeout_seconds=v["worker.job_timeout_seconds"],
            lease_seconds=v["worker.lease_seconds"],
            version_grace_seconds=v["worker.version_grace_seconds"],
            shutdown_wait_seconds=v["worker.shutdown_wait_seconds"],
            poll_delay_seconds=v["worker.poll_delay_seconds"],
        ),
        reconciler=ReconcilerSettings(
            threshold_seconds=v["reconciler.threshold_seconds"], scan_count=v["reconciler.scan_count"]
        ),
        config_file=config_file,
    )
