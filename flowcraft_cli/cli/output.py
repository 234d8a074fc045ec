"""Output that needs no rich: one JSON document, and ``error: ...`` lines. ``render`` here stands in for the
``render`` module and imports it (and rich, ~25 ms) only when a command draws a table, so ``--json`` views
and errors start fast."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any


def print_json(data: Any, *, compact: bool = False) -> None:
    """One JSON document; ``compact`` puts it on one line (a stream of them is then JSON Lines)."""
    text = json.dumps(data, ensure_ascii=False, default=str, indent=None if compact else 2)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    # plain writes: an error stays one line however narrow the terminal, and greps cleanly
    for line in message.splitlines() or [""]:
        sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


class _LazyRender:
    """``render.X``: this module's ``print_json``/``error``, else ``flowcraft_cli.cli.render.X``."""

    def __getattr__(self, name: str) -> Any:
        if name in ("print_json", "error"):
            return globals()[name]
        return getattr(importlib.import_module("flowcraft_cli.cli.render"), name)


render = _LazyRender()
