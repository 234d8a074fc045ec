"""The flowcraft exception tree (stdlib only).

::

    FlowcraftError                 exit_code 1 unless a subclass says otherwise
    ├── InvalidInput               exit 2: bad flag, bad JSON, unknown blueprint id, existing run id
    │   ├── ConfigError            a config file or value that does not validate
    │   ├── BlueprintError         one or more blueprint problems, each "FILE: path: message"
    │   └── ExpressionError        an expression that does not compile (syntax, forbidden construct)
    ├── OperationalError           exit 1: Redis unreachable, run not found, ...
    │   ├── RedisUnavailable
    │   ├── RunNotFound
    │   ├── StateConflict          the request does not fit the run's state (cancel a finished run, ...)
    │   ├── UndecodableValue       a stored value that is not JSON (corrupt, or planted)
    │   └── BlueprintUnavailable   a run's blueprint is neither loaded here nor recorded in Redis
    └── NodeFailure                a node attempt failed (raised inside the engine, recorded, never shown raw)
        └── NodeTimeout

The CLI turns a FlowcraftError into one ``error: ...`` line and its ``exit_code``; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class FlowcraftError(Exception):
    exit_code = 1


class InvalidInput(FlowcraftError):
    exit_code = 2


class ConfigError(InvalidInput):
    pass


class BlueprintError(InvalidInput):
    """Carries every problem found, so a user fixes a file in one pass."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ExpressionError(InvalidInput):
    pass


class ExpressionEvalError(FlowcraftError):
    """A runtime evaluation error: counts as false for conditions and is recorded as a run event."""


class OperationalError(FlowcraftError):
    exit_code = 1


class RedisUnavailable(OperationalError):
    pass


class RunNotFound(OperationalError):
    pass


class StateConflict(OperationalError):
    """Right input, wrong moment: cancelling a finished run, resuming what does not await (CONTRACT §8)."""


class UndecodableValue(OperationalError):
    """A value in a run's hash that is not JSON: it is never unpickled or evaluated (CONTRACT §6.1)."""


class BlueprintUnavailable(OperationalError):
    """A run's blueprint is not loaded here and its definition is not in Redis (a run started before
    definitions were recorded, or one whose definition expired): nothing can be decided for it."""


class NodeFailure(FlowcraftError):
    """A failed node attempt. ``fatal`` skips the remaining attempts and the fallback."""

    def __init__(self, message: str, *, fatal: bool = False, traceback: str | None = None) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.traceback = traceback  # the node's own frames, when its code raised


class NodeTimeout(NodeFailure):
    pass


def json_type(value: object) -> str:
    """A value's type as a user knows it from JSON (null, object, array, string, number, boolean), for
    messages; a value JSON cannot hold keeps its Python type name."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__
