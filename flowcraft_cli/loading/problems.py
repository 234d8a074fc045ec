"""The problem list of one document, and the renderings every problem line shares (bad values, hints).

A problem line is ``FILE: path.in.document: message`` (CONTRACT §3): location first, then what is wrong, the
bad value, and a hint.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

_SIMPLE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class Problems:
    """Every problem found in one document, in the order found; validation reports them all at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.lines)

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{self.source}: {path}: {message}")

    def unknown_key(self, parent: str, key: Any, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        self.add(
            key_path(parent, key),
            f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}",
        )


def did_you_mean(word: object, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    if not isinstance(word, str):
        return ""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def show(value: Any, limit: int = 60) -> str:
    """A user-facing rendering of a bad value: strings quoted, the rest as JSON, long values cut."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value: Any) -> str:
    """The document type of ``value`` as a message says it: ``a mapping``, ``a list``, ``null``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


def is_number(value: Any) -> bool:
    """A finite int or float; booleans are not numbers here."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not (isinstance(value, float) and not math.isfinite(value))
    )


def key_path(parent: str, key: Any) -> str:
    """``parent.key``, or ``parent['odd key']`` when the key is not a plain word."""
    if isinstance(key, str) and _SIMPLE_KEY_RE.match(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{key!r}]"


def list_names(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
