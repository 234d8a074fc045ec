"""The params of the built-in nodes (``loop-controller``, ``sleep``, ``batch``, ``subflow``): their checks
at load, and the helpers the engine uses to read them (sleep durations, loop conditions)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from ..blueprint import BUILTINS, NodeDef
from ..errors import ExpressionError
from ..expressions import Expression, compile_expression
from .problems import Problems, did_you_mean, is_number, key_path, show, type_name

if TYPE_CHECKING:
    from ..registry import NodeRegistry

_DURATION_RE = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(value: Any) -> int:
    """A ``sleep`` duration in milliseconds: a number >= 0 (ms) or a string like ``500ms``, ``30s``, ``5m``,
    ``2h``, ``1d``. Raises ValueError with a message meant for users."""
    if is_number(value):
        if value < 0:
            raise ValueError(f"duration must be >= 0 milliseconds, got {show(value)}")
        return math.ceil(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return int(m.group(1)) * _DURATION_UNITS_MS[m.group(2)]
    raise ValueError(
        f"invalid duration {show(value)}: expected milliseconds (a number >= 0) "
        "or a string like '500ms', '30s', '5m', '2h' or '1d'"
    )


@functools.lru_cache(maxsize=4096)
def _compile_cached(source: str) -> Expression:
    return compile_expression(source)


def loop_condition(node: NodeDef) -> Expression | None:
    """The compiled ``params.condition`` of a loop-controller (None when absent), cached by source text."""
    source = node.params.get("condition")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ExpressionError(f"loop-controller {node.id!r}: params.condition must be a string expression")
    return _compile_cached(source)


def check_builtin_params(
    uses: str,
    params: Mapping[str, Any],
    path: str,
    problems: Problems,
    registry: NodeRegistry | None,
    known_blueprint_ids: Collection[str] | None,
) -> None:
    """The params of the built-in ``uses`` at ``path`` (a node's path); nothing for any other node."""
    if uses == "batch":
        _check_batch(params, f"{path}.params", problems, registry)
    elif uses == "subflow":
        _check_subflow(params, f"{path}.params", problems, known_blueprint_ids)
    elif uses == "sleep":
        duration = params.get("duration")
        if duration is None:
            problems.add(
                f"{path}.params.duration",
                "missing: a sleep node needs a duration (ms, or '30s', '5m', ...)",
            )
        else:
            try:
                parse_duration_ms(duration)
            except ValueError as e:
                problems.add(f"{path}.params.duration", str(e))
    elif uses == "loop-controller":
        _check_loop(params, f"{path}.params", problems)


def _check_batch(
    params: Mapping[str, Any], path: str, problems: Problems, registry: NodeRegistry | None
) -> None:
    worker = params.get("worker")
    if worker is None:
        problems.add(f"{path}.worker", "missing: a batch node needs the name of the node to run per item")
    elif not isinstance(worker, str) or not worker:
        problems.add(f"{path}.worker", f"must be a node name, got {show(worker)}")
    elif worker in BUILTINS:
        problems.add(f"{path}.worker", f"{worker!r} is a built-in; a batch worker must be a registered node")
    elif registry is not None and worker not in registry:
        problems.add(
            f"{path}.worker",
            f"{worker!r} is not registered{did_you_mean(worker, registry.names())}",
        )


def _check_subflow(
    params: Mapping[str, Any], path: str, problems: Problems, known_blueprint_ids: Collection[str] | None
) -> None:
    bid = params.get("blueprintId")
    if bid is None:
        problems.add(f"{path}.blueprintId", "missing: a subflow node needs the id of the blueprint to run")
    elif not isinstance(bid, str) or not bid:
        problems.add(f"{path}.blueprintId", f"must be a blueprint id string, got {show(bid)} (quote it)")
    elif known_blueprint_ids is not None and bid not in known_blueprint_ids:
        hint = did_you_mean(bid, sorted(known_blueprint_ids))
        problems.add(f"{path}.blueprintId", f"unknown blueprint {bid!r}{hint}")
    for key in ("inputs", "outputs"):
        value = params.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            problems.add(f"{path}.{key}", f"must be a mapping of {{key: key}}, got {type_name(value)}")
            continue
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                problems.add(key_path(f"{path}.{key}", k), f"must map a string to a string, got {show(v)}")


def _check_loop(params: Mapping[str, Any], path: str, problems: Problems) -> None:
    condition = params.get("condition")
    if condition is not None:
        if not isinstance(condition, str):
            problems.add(f"{path}.condition", f"must be a string expression, got {show(condition)}")
        else:
            try:
                _compile_cached(condition)
            except ExpressionError as e:
                problems.add(f"{path}.condition", str(e))
    max_iter = params.get("maxIterations")
    if max_iter is not None and not (
        isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 1
    ):
        problems.add(f"{path}.maxIterations", f"must be an integer >= 1, got {show(max_iter)}")
