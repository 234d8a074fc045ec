"""Blueprint files and folders to validated blueprints: one file, or every file under some paths at once
(duplicate blueprint ids and subflows naming a blueprint that is not there are cross-file problems)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..blueprint import Blueprint
from ..errors import BlueprintError
from .decode import read_document
from .parse import parse_blueprint

if TYPE_CHECKING:
    from collections.abc import Collection

    from ..registry import NodeRegistry

BLUEPRINT_SUFFIXES = (".yaml", ".yml", ".json")


def load_blueprint_file(
    path: str | os.PathLike[str],
    *,
    registry: NodeRegistry | None = None,
    known_blueprint_ids: Collection[str] | None = None,
) -> Blueprint:
    """Read and validate one YAML/JSON blueprint file; its id defaults to the file name without extension."""
    source = os.fspath(path)
    p = Path(source)
    if not p.is_file():
        raise BlueprintError([f"{source}: no such file"])
    data, problems = read_document(p, source)
    if problems:
        raise BlueprintError(problems)
    return parse_blueprint(
        data, source=source, default_id=p.stem, registry=registry, known_blueprint_ids=known_blueprint_ids
    )


def _collect_files(paths: Iterable[str | os.PathLike[str]], problems: list[str]) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(p: Path, shown: str) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append((p, shown))

    for given in paths:
        shown = os.fspath(given)
        p = Path(shown)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in BLUEPRINT_SUFFIXES
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            for f in found:
                add(f, os.path.join(shown, *f.relative_to(p).parts))
        elif p.is_file():
            if p.suffix.lower() not in BLUEPRINT_SUFFIXES:
                problems.append(f"{shown}: not a blueprint file (expected .yaml, .yml or .json)")
            else:
                add(p, shown)
        else:
            problems.append(f"{shown}: no such file or directory")
    return files


def load_blueprints(
    paths: Iterable[str | os.PathLike[str]],
    registry: NodeRegistry | None = None,
) -> dict[str, Blueprint]:
    """Load every blueprint from files and folders (searched recursively for *.yaml, *.yml, *.json).

    Problems from all files are collected into one BlueprintError: unreadable or invalid files, duplicate
    blueprint ids across files, subflows naming a blueprint that was not loaded.
    """
    blueprints, problems, _ = load_blueprints_lenient(paths, registry)
    if problems:
        raise BlueprintError(problems)
    return blueprints


def load_blueprints_lenient(
    paths: Iterable[str | os.PathLike[str]],
    registry: NodeRegistry | None = None,
) -> tuple[dict[str, Blueprint], list[str], set[str]]:
    """Like :func:`load_blueprints`, but returns ``(blueprints that are valid, problems, ids with a problem)``
    instead of raising: a command that runs one blueprint need not be stopped by a broken file elsewhere."""
    problems: list[str] = []
    broken: set[str] = set()
    documents: list[tuple[str, str, Any]] = []  # (source, id, data) of files that decoded
    known: set[str] = set()
    for path, source in _collect_files(paths, problems):
        data, file_problems = read_document(path, source)
        declared = data.get("id") if isinstance(data, Mapping) else None
        blueprint_id = declared if isinstance(declared, str) and declared else path.stem
        known.add(blueprint_id)  # even for a broken file, so its subflow callers get no second complaint
        if file_problems:
            problems.extend(file_problems)
            broken.add(blueprint_id)
        else:
            documents.append((source, blueprint_id, data))

    blueprints: dict[str, Blueprint] = {}
    defined_in: dict[str, str] = {}
    for source, blueprint_id, data in documents:
        stem = Path(source).stem
        try:
            bp = parse_blueprint(
                data, source=source, default_id=stem, registry=registry, known_blueprint_ids=known
            )
        except BlueprintError as e:
            problems.extend(e.problems)
            broken.add(blueprint_id)
            bp = None
        first = defined_in.get(blueprint_id)
        if first is not None:
            problems.append(
                f"{source}: id: duplicate blueprint id {blueprint_id!r} (also defined in {first})"
            )
            broken.add(blueprint_id)
            continue
        defined_in[blueprint_id] = source
        if bp is not None:
            blueprints[bp.id] = bp
    return {k: v for k, v in blueprints.items() if k not in broken}, problems, broken
