"""The params of the built-in nodes (``loop-controller``, ``sleep``, ``batch``, ``subflow``), checked and
parsed once at load into the typed specs of :mod:`flowcraft_cli.blueprint` (``NodeDef.spec``)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from ..blueprint import (
    BUILTINS,
    DEFAULT_MAX_ITERATIONS,
    BatchSpec,
    BuiltinSpec,
    LoopSpec,
    NodeDef,
    SleepSpec,
    SubflowSpec,
)
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
    """The compiled ``params.condition`` of a loop-controller (None when absent), cached by source text.

    The same object as ``node.spec.condition`` of a loaded node (one cache); the spec is the one to read."""
    source = node.params.get("condition")
    if source is None:
        return None
    if not isinstance(source, str):
        raise ExpressionError(f"loop-controller {node.id!r}: params.condition must be a string expression")
    return _compile_cached(source)


def parse_spec(
    uses: str,
    params: Mapping[str, Any],
    path: str,
    problems: Problems,
    registry: NodeRegistry | None,
    known_blueprint_ids: Collection[str] | None,
) -> BuiltinSpec | None:
    """The spec of the built-in ``uses`` from its params (``path`` is the node's), or None: for a node with
    no spec (``wait``, registered nodes) or when the params have a problem, added to ``problems``."""
    if uses == "batch":
        return _parse_batch(params, f"{path}.params", problems, registry)
    if uses == "subflow":
        return _parse_subflow(params, f"{path}.params", problems, known_blueprint_ids)
    if uses == "sleep":
        return _parse_sleep(params, f"{path}.params", problems)
    if uses == "loop-controller":
        return _parse_loop(params, f"{path}.params", problems)
    return None


def _parse_batch(
    params: Mapping[str, Any], path: str, problems: Problems, registry: NodeRegistry | None
) -> BatchSpec | None:
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
    else:
        return BatchSpec(worker)
    return None


def _parse_subflow(
    params: Mapping[str, Any], path: str, problems: Problems, known_blueprint_ids: Collection[str] | None
) -> SubflowSpec | None:
    blueprint_id: str | None = None
    bid = params.get("blueprintId")
    if bid is None:
        problems.add(f"{path}.blueprintId", "missing: a subflow node needs the id of the blueprint to run")
    elif not isinstance(bid, str) or not bid:
        problems.add(f"{path}.blueprintId", f"must be a blueprint id string, got {show(bid)} (quote it)")
    elif known_blueprint_ids is not None and bid not in known_blueprint_ids:
        hint = did_you_mean(bid, sorted(known_blueprint_ids))
        problems.add(f"{path}.blueprintId", f"unknown blueprint {bid!r}{hint}")
    else:
        blueprint_id = bid
    inputs, inputs_ok = _key_mapping(params, "inputs", path, problems)
    outputs, outputs_ok = _key_mapping(params, "outputs", path, problems)
    if blueprint_id is None or not (inputs_ok and outputs_ok):
        return None
    return SubflowSpec(blueprint_id, inputs, outputs)


def _key_mapping(
    params: Mapping[str, Any], key: str, path: str, problems: Problems
) -> tuple[dict[str, str] | None, bool]:
    """``params[key]`` as a ``{str: str}`` copy (None when not given), and whether it was valid."""
    value = params.get(key)
    if value is None:
        return None, True
    if not isinstance(value, Mapping):
        problems.add(f"{path}.{key}", f"must be a mapping of {{key: key}}, got {type_name(value)}")
        return None, False
    mapping: dict[str, str] = {}
    ok = True
    for k, v in value.items():
        if isinstance(k, str) and isinstance(v, str):
            mapping[k] = v
        else:
            problems.add(key_path(f"{path}.{key}", k), f"must map a string to a string, got {show(v)}")
            ok = False
    return mapping, ok


def _parse_sleep(params: Mapping[str, Any], path: str, problems: Problems) -> SleepSpec | None:
    duration = params.get("duration")
    if duration is None:
        problems.add(f"{path}.duration", "missing: a sleep node needs a duration (ms, or '30s', '5m', ...)")
        return None
    try:
        return SleepSpec(parse_duration_ms(duration))
    except ValueError as e:
        problems.add(f"{path}.duration", str(e))
        return None


def _parse_loop(params: Mapping[str, Any], path: str, problems: Problems) -> LoopSpec | None:
    ok = True
    condition = params.get("condition")
    compiled: Expression | None = None
    if condition is not None:
        if not isinstance(condition, str):
            problems.add(f"{path}.condition", f"must be a string expression, got {show(condition)}")
            ok = False
        else:
            try:
                compiled = _compile_cached(condition)
            except ExpressionError as e:
                problems.add(f"{path}.condition", str(e))
                ok = False
    max_iter = params.get("maxIterations")
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITERATIONS
    elif not (isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 1):
        problems.add(f"{path}.maxIterations", f"must be an integer >= 1, got {show(max_iter)}")
        ok = False
    return LoopSpec(compiled, max_iter) if ok else None
