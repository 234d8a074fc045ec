"""Mermaid rendering of a blueprint (``flowcraft graph``)."""

from __future__ import annotations

from .blueprint import Blueprint, EdgeDef

# Mermaid entity codes; '#' first, or the codes themselves would be escaped again.
_ESCAPES = (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"))


def _text(value: str) -> str:
    """User text made safe inside a quoted Mermaid label (node ids and expressions may contain anything)."""
    for raw, code in _ESCAPES:
        value = value.replace(raw, code)
    return " ".join(value.splitlines())


def _edge_label(edge: EdgeDef) -> str:
    parts = [
        part
        for part in (
            edge.action,
            edge.condition.source if edge.condition is not None else None,
            edge.transform.source if edge.transform is not None else None,
        )
        if part
    ]
    return " | ".join(parts)


def render_mermaid(bp: Blueprint) -> str:
    """A ``flowchart TD``: nodes as ``n<i>`` (ids may contain any character) labelled ``id<br/>uses``, edges
    labelled ``action | condition | transform``, fallbacks as dotted arrows."""
    lines = ["flowchart TD"]
    if not bp.nodes:
        lines.append('  empty["Empty Blueprint"]')
        return "\n".join(lines)
    ref = {n.id: f"n{i}" for i, n in enumerate(bp.nodes)}
    for n in bp.nodes:
        lines.append(f'  {ref[n.id]}["{_text(n.id)}<br/>{_text(n.uses)}"]')
    for e in bp.edges:
        source, target = ref.get(e.source), ref.get(e.target)
        if source is None or target is None:
            continue
        label = _edge_label(e)
        if label:
            lines.append(f'  {source} -- "{_text(label)}" --> {target}')
        else:
            lines.append(f"  {source} --> {target}")
    for n in bp.nodes:
        fallback = ref.get(n.config.fallback) if n.config.fallback else None
        if fallback is not None:
            lines.append(f"  {ref[n.id]} -. fallback .-> {fallback}")
    return "\n".join(lines)
