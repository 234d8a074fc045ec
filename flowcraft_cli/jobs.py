"""The unit of work both runtimes schedule: one step of one node of one run."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from .ids import field_name

#: exec: run the node (attempt N) · fallback: run the node's fallback (attempt N) · item: one batch item ·
#: gather: finish a batch · wake: end a sleep · child: a subflow's child run has finished ·
#: child_wait: a subflow's child run rests awaiting
JOB_KINDS = frozenset({"exec", "fallback", "item", "gather", "wake", "child", "child_wait"})


@dataclass(frozen=True, slots=True)
class Job:
    run_id: str
    node_id: str
    seq: int  # which firing of the node: loops fire a node again with seq + 1
    kind: str = "exec"
    attempt: int = 1
    item: int = -1  # batch item index, for kind "item"
    not_before_ms: int = 0  # epoch ms before which the job must not run (retry backoff, sleep)
    # how many times this step was recovered after its worker died or dropped it: a recovered step gets a
    # new job id, so the queue's own lock on the dead job (and the dead job itself) cannot block it
    recovery: int = 0
    # its job id, once asked (a step names its job's id several times: outbox, queue, listing, events)
    _id: str = field(default="", init=False, repr=False, compare=False)

    @property
    def job_id(self) -> str:
        """Deterministic, so scheduling the same step twice is a no-op in the queue."""
        if self._id:
            return self._id
        parts: tuple[object, ...] = (self.run_id, self.node_id, self.seq, self.kind, self.attempt)
        if self.item >= 0:
            parts = (*parts, self.item)
        if self.recovery:
            parts = (*parts, f"r{self.recovery}")
        job_id = field_name(*parts)
        object.__setattr__(self, "_id", job_id)  # (frozen: set once, derived from the fields above)
        return job_id

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies field by field, and every step turns jobs into dicts
        return {"run_id": self.run_id, "node_id": self.node_id, "seq": self.seq, "kind": self.kind,
                "attempt": self.attempt, "item": self.item, "not_before_ms": self.not_before_ms,
                "recovery": self.recovery}

    @classmethod
    def from_dict(cls, data: Any) -> Job:
        """Strict: a job that does not decode to exactly this shape is refused (ValueError)."""
        if not isinstance(data, dict):
            raise ValueError(f"job payload must be an object, got {type(data).__name__}")
        expected = {"run_id": str, "node_id": str, "seq": int, "kind": str, "attempt": int, "item": int,
                    "not_before_ms": int, "recovery": int}
        unknown = set(data) - set(expected)
        if unknown:
            raise ValueError(f"job payload has unknown keys {sorted(unknown)}")
        for key, typ in expected.items():
            if key in ("kind", "attempt", "item", "not_before_ms", "recovery") and key not in data:
                continue
            value = data.get(key)
            if not isinstance(value, typ) or isinstance(value, bool):
                raise ValueError(f"job payload {key!r} must be {typ.__name__}, got {value!r}")
        job = cls(**data)
        if job.kind not in JOB_KINDS:
            raise ValueError(f"job payload kind {job.kind!r} is not one of {sorted(JOB_KINDS)}")
        if job.seq < 1 or job.attempt < 1 or job.recovery < 0:
            raise ValueError("job payload seq and attempt must be >= 1, recovery >= 0")
        return job


assert [f.name for f in fields(Job) if f.init] == list(Job("r", "n", 1).to_dict())  # to_dict names every field


class Picked(NamedTuple):
    """A queue job a worker's commit took for it (RedisStore: ``commit.OP_PICK``), to run next."""

    job_id: str
    payload: bytes  # the queue's (arq's) record of the job
    tries: int  # how many times it was delivered, this time included
    fresh: list[bytes | None]  # the current values of the fields its payload's "reread" names, in order
