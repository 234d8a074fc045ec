"""Found by a hostile review of the one-call commit and inline steps: a refusal decided on a stale cache, and an
inline step stranded by a Redis error before it started. Each failed before its fix."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.harness import make_adapter

WAIT = """
id: w1
nodes:
  - {id: a, uses: tag}
  - {id: w, uses: wait}
  - {id: b, uses: tag}
edges:
  - {source: a, target: w}
  - {source: w, target: b}
"""
FLAKY = """
id: r1
nodes:
  - {id: a, uses: tag}
  - {id: b, uses: flaky, config: {maxRetries: 1}}
edges:
  - {source: a, target: b}
"""
CHAIN = """
id: ch
nodes:
  - {id: a, uses: tag}
  - {id: b, uses: tag}
edges:
  - {source: a, target: b}
"""


def _tag(ctx):
    return ctx.node_id


async def _close(*adapters) -> None:
    for a in adapters:
        await a.close()
        await a.redis.aclose()


def test_a_client_that_started_the_run_can_resume_it(redis_url):
    """The client's cache still says the wait node has not fired; resume must not raise StateConflict on it
    (the exception path of a transaction skips the commit's read validation)."""

    async def go():
        c = make_adapter(Redis.from_url(redis_url), [WAIT], {"tag": _tag}, queue_name="rr-1")
        w = make_adapter(Redis.from_url(redis_url), [WAIT], {"tag": _tag}, queue_name="rr-1")
        try:
            run_id = await c.start_run("w1", {})
            await w.start(burst=True)
            assert (await c.inspect(run_id)).status == "awaiting"
            await c.resume(run_id, "w", output={"ok": 1})
            await w.start(burst=True)
            return (await c.inspect(run_id)).status
        finally:
            await _close(c, w)

    assert asyncio.run(go()) == "completed"


def test_a_client_that_started_the_run_can_retry_it(redis_url):
    state = {"fail": True}

    def flaky(ctx):
        if state["fail"]:
            raise RuntimeError("boom")
        return "ok"

    async def go():
        nodes = {"tag": _tag, "flaky": flaky}
        c = make_adapter(Redis.from_url(redis_url), [FLAKY], nodes, queue_name="rr-2")
        w = make_adapter(Redis.from_url(redis_url), [FLAKY], nodes, queue_name="rr-2")
        try:
            run_id = await c.start_run("r1", {})
            await w.start(burst=True)
            assert (await c.inspect(run_id)).status == "failed"
            state["fail"] = False
            await c.retry(run_id)  # raised StateConflict: "run is running; only a failed run can be retried"
            await w.start(burst=True)
            return (await c.inspect(run_id)).status
        finally:
            await _close(c, w)

    assert asyncio.run(go()) == "completed"


def test_a_redis_error_before_an_inline_step_starts_does_not_strand_it(redis_url):
    """The inline step's claim token is added to active_tokens by its predecessor's commit; a Redis error in
    Engine._handle before Step.run (preload of a >64 KB input, peek) leaves it there, so the worker's own
    heartbeat finds the step 'held', recovers nothing, and unlists it: b stays running forever."""
    calls: list[str] = []

    def tag(ctx):
        calls.append(ctx.node_id)
        return ctx.node_id

    async def go():
        w = make_adapter(Redis.from_url(redis_url), [CHAIN], {"tag": tag}, queue_name="rr-3")
        try:
            w.create_worker()  # inline steps on, as a worker process has them
            run_id = await w.start_run("ch", {})
            first = (await w.engine.expected_jobs(run_id))[0][0]
            real = w.store.preload

            async def flaky(run, wanted):
                if wanted.get("nodes") == ["b"]:
                    raise RedisConnectionError("Redis went away")
                return await real(run, wanted)

            w.store.preload = flaky
            await w.workers.beat(w._fields())
            # a's commit took a's job out of the queue (its slot went on with b): nothing to hand back to arq
            assert await w.step({"job_id": first.job_id}, first.to_dict()) == "left to recovery"
            assert await w.redis.zscore("rr-3", first.job_id) is None
            w.store.preload = real
            await w._beat()  # the worker's own heartbeat recovers its listed steps that are not in flight
            await w.start(burst=True)
            return (await w.inspect(run_id)).status
        finally:
            await _close(w)

    assert asyncio.run(go()) == "completed"
    assert calls.count("b") == 1
