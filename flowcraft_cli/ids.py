"""Identifiers: the one codec for composite names.

Node ids may hold any character, but Redis field names and job ids are built from several parts joined by
``|``; ``field_name`` escapes each part so that no two distinct tuples ever share a name (CONTRACT §6.1).
"""

from __future__ import annotations

_ESCAPES = str.maketrans({"%": "%25", "|": "%7C", "#": "%23"})


def field_name(*parts: object) -> str:
    """``parts`` escaped (``%`` ``|`` ``#``) and joined by ``|``: an escaped part holds no ``|``, and never
    is a bare ``#``, which callers may append as a marker (a join's count field)."""
    return "|".join(str(p).translate(_ESCAPES) for p in parts)
