"""Joins and dead paths (CONTRACT §5.5), as pure decisions over a node's record and its arrivals: whether
an arrival still counts, whether a join fires, waits or is skipped, and what input a fired join gets.
``lifecycle.RunTxn`` reads the values and writes what these decide."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from ..blueprint import JoinStrategy
from .state import ACTIVE_NODE, REF, Arrival, NodeRecord, NodeStatus, evolve


class JoinVerdict(StrEnum):
    WAIT = "wait"  # not decided yet: more predecessors must arrive
    FIRE = "fire"
    SKIP = "skip"  # every predecessor decided and none was taken: a dead path, which travels on


def decided_in(rec: NodeRecord | None, gen: int) -> bool:
    """Was the node already fired or skipped in generation ``gen``? Then an arrival is a duplicate or late.
    (A record that never stored ``fired_gen`` counts as decided in its generation unless it is pending.)"""
    if rec is None:
        return False
    fired_gen = rec.fired_gen if rec.fired_gen is not None else (gen if rec.status != NodeStatus.PENDING else -1)
    return fired_gen == gen


def is_busy(rec: NodeRecord | None) -> bool:
    """Still busy with a previous loop iteration: its completion looks at the join again."""
    return rec is not None and rec.status in ACTIVE_NODE


def needs_recheck(rec: NodeRecord | None) -> bool:
    """A node that finished after a loop ``continue`` moved it to a new generation, and has not fired in
    it: the arrivals of that generation may already decide it."""
    if rec is None or rec.status in ACTIVE_NODE:
        return False
    return (rec.fired_gen if rec.fired_gen is not None else rec.gen) != rec.gen


def count_arrival(counts: tuple[int, int] | None, taken: bool) -> tuple[int, int]:
    """A join's ``(decided, taken)`` after one more arrival."""
    decided, n_taken = counts or (0, 0)
    return decided + 1, n_taken + int(taken)


def decide_join(strategy: JoinStrategy, n_predecessors: int, counts: tuple[int, int]) -> JoinVerdict:
    """``any``: fire on a taken arrival; ``all``: once every predecessor decided, fire if one was taken,
    else skip."""
    decided, taken = counts
    if strategy == JoinStrategy.ANY and taken:
        return JoinVerdict.FIRE
    if decided >= n_predecessors:
        return JoinVerdict.FIRE if taken else JoinVerdict.SKIP
    return JoinVerdict.WAIT


def first_taken(predecessors: Sequence[str], arrivals: Mapping[str, Arrival]) -> str:
    """The first predecessor (in blueprint order) whose arrival was taken: what an ``any`` join fires on when
    it is re-checked rather than triggered by one arrival."""
    return next(p for p in predecessors if (a := arrivals.get(p)) is not None and a.taken)


def taken_sources(predecessors: Sequence[str], arrivals: Mapping[str, Arrival]) -> list[str]:
    return [p for p in predecessors if (a := arrivals.get(p)) is not None and a.taken]


def join_input(predecessors: Sequence[str], arrivals: Mapping[str, Arrival], outputs: Mapping[str, Any]) -> Any:
    """A single predecessor delivers its value; several deliver ``{source_id: value}`` of the edges that
    were taken. ``outputs``: the outputs of the taken sources whose arrival carries no value of its own."""
    values = {p: (arrivals[p].value if arrivals[p].value is not REF else outputs.get(p))
              for p in taken_sources(predecessors, arrivals)}
    if len(predecessors) == 1:
        return next(iter(values.values()))
    return values


def skipped(rec: NodeRecord | None, gen: int) -> NodeRecord:
    """The record of a node skipped in ``gen`` (a dead path)."""
    return evolve(rec or NodeRecord(), status=NodeStatus.SKIPPED, gen=gen, fired_gen=gen)
