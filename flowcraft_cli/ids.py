"""Identifiers: run ids (checked), subflow child run ids, and the one codec for composite names.

Node ids may hold any character, but Redis field names and job ids are built from several parts joined by
``|``; ``field_name`` escapes each part so that no two distinct tuples ever share a name (CONTRACT §6.1).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re

from .errors import InvalidInput

RUN_ID_MAX = 128
CHILD_SEP = "::"  # reserved: only subflow child run ids contain it, so no user id can take a child's id
_RUN_ID_CHARS = re.compile(r"[A-Za-z0-9_.:-]+")
_PLAIN_NODE_ID = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = str.maketrans({"%": "%25", "|": "%7C", "#": "%23"})
# claim tokens tell one claim of a node from another: unique, not secret, so not ``secrets`` (one getrandom
# syscall a step, 2% of a worker's CPU). Seeded from os.urandom at import, and again in a forked child, so
# that no two processes share a sequence
_TOKENS = random.Random()
os.register_at_fork(after_in_child=_TOKENS.seed)


def claim_token() -> str:
    """12 hex digits naming one claim of a node (the commit that ends the step must carry it)."""
    return f"{_TOKENS.getrandbits(48):012x}"


@functools.lru_cache(maxsize=1 << 16, typed=True)
def field_name(*parts: object) -> str:
    """``parts`` escaped (``%`` ``|`` ``#``) and joined by ``|``: an escaped part holds no ``|``, and never
    is a bare ``#``, which callers may append as a marker (a join's count field). Remembered: a step names
    the same job ids and join fields several times (a 200-branch fan-out, each of them three times)."""
    return "|".join([p.translate(_ESCAPES) if type(p) is str else str(p).translate(_ESCAPES) for p in parts])


def check_run_id(run_id: str) -> str:
    """A user-supplied id for a new run: 1-128 characters of ``[A-Za-z0-9_.:-]``, without ``::``."""
    check_run_ref(run_id)
    if len(run_id) > RUN_ID_MAX:
        raise InvalidInput(
            f"run id {run_id[:40]!r}...: {len(run_id)} characters; at most {RUN_ID_MAX} allowed"
        )
    if CHILD_SEP in run_id:
        raise InvalidInput(f"run id {run_id!r}: '{CHILD_SEP}' is reserved for subflow child runs")
    return run_id


def check_run_ref(run_id: str) -> str:
    """An id naming an existing run (a child run's id may be longer than 128 characters)."""
    if not run_id:
        raise InvalidInput("run id '': must not be empty")
    if not _RUN_ID_CHARS.fullmatch(run_id):
        bad = "".join(sorted({c for c in run_id if not _RUN_ID_CHARS.fullmatch(c)}))
        raise InvalidInput(f"run id {run_id!r}: {bad!r} not allowed; use letters, digits and '_.:-'")
    return run_id


def child_run_id(parent_run_id: str, node_id: str, seq: int, attempt: int) -> str:
    """``<parent>::<node>.<seq>.<attempt>``; a node id with other characters than ``[A-Za-z0-9_-]`` is
    replaced by ``h`` and 12 hex digits of its sha256, so the id stays in the run id charset."""
    part = (
        node_id
        if _PLAIN_NODE_ID.fullmatch(node_id)
        else "h" + hashlib.sha256(node_id.encode()).hexdigest()[:12]
    )
    return f"{parent_run_id}{CHILD_SEP}{part}.{seq}.{attempt}"
