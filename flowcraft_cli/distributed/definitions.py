"""Blueprint definitions kept in Redis, so that views, ``cancel`` and ``reconcile`` need no local files
(CONTRACT §10). A run's start records its blueprint's document under ``keys.blueprint_key(id, version)``
(``RedisStore``); this module reads it back.

Two ways to read one: ``read_outline`` gives the node ids and their ``uses`` in document order, which is all
a view needs, from the JSON alone (no loader, no PyYAML); ``load_definition`` parses the whole document into a
``Blueprint`` (without checking ``uses`` against a node registry) for the engine to cancel or reconcile a
run whose blueprint this process did not load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ..blueprint import Blueprint


def document_of(bp: Blueprint) -> str:
    """The JSON stored for ``bp``: its document as loaded, with its id filled in."""
    return json.dumps({**bp.raw, "id": bp.id}, separators=(",", ":"), ensure_ascii=False, default=str)


async def read_document(redis: Redis, blueprint_id: str, version: str) -> dict[str, Any] | None:
    raw = await redis.get(keys.blueprint_key(blueprint_id, version))
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None  # corrupt or planted: treated as absent, never evaluated
    return doc if isinstance(doc, dict) else None


def outline_of(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(node id, uses) in document order; ``nodes`` may be a list or a mapping (as the loader accepts)."""
    nodes = doc.get("nodes")
    items = list(nodes.values()) if isinstance(nodes, Mapping) else nodes if isinstance(nodes, list) else []
    return [(str(n["id"]), str(n.get("uses", "?"))) for n in items if isinstance(n, Mapping) and "id" in n]


async def read_outline(redis: Redis, blueprint_id: str, version: str) -> list[tuple[str, str]] | None:
    doc = await read_document(redis, blueprint_id, version)
    return None if doc is None else outline_of(doc)


class Definitions:
    """Blueprints of runs this process did not load, read from Redis once per (id, version)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._cache: dict[tuple[str, str], Blueprint | None] = {}

    async def load(self, blueprint_id: str, version: str) -> Blueprint | None:
        key = (blueprint_id, version)
        if key not in self._cache:
            self._cache[key] = await self._parse(blueprint_id, version)
        return self._cache[key]

    async def _parse(self, blueprint_id: str, version: str) -> Blueprint | None:
        from ..errors import BlueprintError
        from ..loading import parse_blueprint

        doc = await read_document(self.redis, blueprint_id, version)
        if doc is None:
            return None
        try:
            bp = parse_blueprint(doc, source=keys.blueprint_key(blueprint_id, version), default_id=blueprint_id)
        except BlueprintError:
            return None
        # the version the run recorded, whatever the stored document hashes to (a YAML date stored as text)
        bp.__dict__["version"] = version
        return bp
