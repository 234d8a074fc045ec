"""The step path's round trips on connections of its own (``distributed.scripting.HeldConnections``): what
redis-py's client would have survived, they survive too. Real Redis; connections are killed or scripts
flushed by Redis itself."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from flowcraft_cli.distributed import scripting
from flowcraft_cli.distributed.scripting import HeldConnections

ECHO = "return redis.call('GET', KEYS[1]) or ARGV[1]"


class HeldScript:
    """One script on held connections, as the Redis store calls its commit."""

    def __init__(self, redis: Redis, source: str) -> None:
        self.held = HeldConnections(redis)
        self.script = redis.register_script(source)
        self._idle = self.held._idle

    async def __call__(self, keys, args):
        return await self.held.script(self.script, keys, args)

    async def close(self) -> None:
        await self.held.close()


def _run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def _scripts(redis_url: str, *sources: str):
    """A client, and one HeldScript per source on it; all closed on the way out."""
    redis = Redis.from_url(redis_url)
    scripts = [HeldScript(redis, source) for source in sources]
    try:
        yield redis, *scripts
    finally:
        for script in scripts:
            await script.close()
        await redis.aclose()


def test_a_flushed_script_is_loaded_again(redis_url):
    async def go():
        async with _scripts(redis_url, ECHO) as (redis, script):
            assert await script(["held:none"], ["first"]) == b"first"
            await redis.script_flush()  # as after a restart: Redis knows no script
            assert await script(["held:none"], ["again"]) == b"again"
            assert await script(["held:none"], ["and again"]) == b"and again"
    _run(go())


def test_an_error_reply_leaves_the_connection_usable(redis_url):
    async def go():
        async with _scripts(redis_url, "return redis.error_reply('NOPE ' .. ARGV[1])", ECHO) as (_, script, good):
            for i in range(3):
                try:
                    await script([], [str(i)])
                except ResponseError as e:
                    assert str(e) == f"NOPE {i}"
                else:
                    raise AssertionError("an error reply raised nothing")
            assert len(script._idle) == 1  # the one connection, kept and reused
            assert await good(["held:none"], ["ok"]) == b"ok"
    _run(go())


def test_an_idle_connection_redis_closed_is_opened_again(redis_url, monkeypatch):
    """Redis drops the held connection (CLIENT KILL stands for an idle timeout or a restart); the next call
    after a pause finds it closed before it sends, and goes on a new one."""
    monkeypatch.setattr(scripting, "_CHECK_AFTER_S", 0.0)

    async def go():
        async with _scripts(redis_url, ECHO) as (redis, script):
            assert await script(["held:none"], ["one"]) == b"one"
            held = script._idle[0][0]
            await held.send_command("CLIENT", "ID")
            first = await held.read_response()
            assert await redis.client_kill_filter(_id=first) == 1
            assert await script(["held:none"], ["two"]) == b"two"
            assert script._idle[0][0] is held  # the same object, connected again
            await held.send_command("CLIENT", "ID")
            assert await held.read_response() != first
    _run(go())


def test_a_cancelled_call_does_not_leave_its_reply_for_the_next(redis_url):
    """A call cancelled while its reply is on the way: the next call must read its own reply, not that one."""
    busy_50ms = ("local t = redis.call('TIME'); local s = tonumber(t[1]) * 1e6 + tonumber(t[2]);"
                 " repeat local n = redis.call('TIME') until (tonumber(n[1]) * 1e6 + tonumber(n[2])) - s > 50000;"
                 " return ARGV[1]")

    async def go():
        async with _scripts(redis_url, busy_50ms) as (_, slow):
            task = asyncio.create_task(slow([], ["stale"]))
            await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert await slow([], ["fresh"]) == b"fresh"
    _run(go())


def test_a_pipeline_reads_every_reply_even_after_an_error(redis_url):
    """A pipeline whose middle command is refused (WRONGTYPE) raises that error, after reading the replies
    behind it: the connection stays in step for the next call."""
    async def go():
        redis = Redis.from_url(redis_url)
        held = HeldConnections(redis)
        try:
            await redis.set("held:str", "v")
            await redis.hset("held:hash", mapping={"a": "1", "b": "2"})
            try:
                await held.pipeline([("HMGET", "held:hash", "a"), ("HMGET", "held:str", "a"),
                                     ("HMGET", "held:hash", "b")])
            except ResponseError as e:
                assert "WRONGTYPE" in str(e)
            else:
                raise AssertionError("a refused command raised nothing")
            assert await held.pipeline([("HMGET", "held:hash", "b", "a", "zz")]) == [[b"2", b"1", None]]
            assert len(held._idle) == 1
        finally:
            await held.close()
            await redis.aclose()
    _run(go())


def test_calls_beyond_the_held_connections_go_through_the_clients_pool(redis_url, monkeypatch):
    """Many calls at once (a client starting runs from a thousand tasks): at most MAX_HELD connections are
    held, the rest go through the client's own pool; every call gets its own reply."""
    monkeypatch.setattr(scripting, "MAX_HELD", 3)

    async def go():
        async with _scripts(redis_url, "redis.call('INCR', KEYS[1]); return ARGV[1]") as (redis, script):
            held = script.held
            await redis.delete("held:count")
            replies = await asyncio.gather(*(script(["held:count"], [str(i)]) for i in range(40)))
            reads = await asyncio.gather(*(held.pipeline([("GET", "held:count"), ("ECHO", str(i))])
                                           for i in range(40)))
            return replies, reads, held._open, len(held._idle)

    replies, reads, opened, idle = _run(go())
    assert replies == [str(i).encode() for i in range(40)]
    assert [r[1] for r in reads] == [str(i).encode() for i in range(40)] and {r[0] for r in reads} == {b"40"}
    assert opened <= 3 and idle == opened


def test_commands_are_packed_as_redis_py_packs_them():
    from redis.asyncio.connection import Connection

    conn = Connection()
    for args in [("EVALSHA", "a" * 40, 2, "k:é", "k|%7C", b"\xff\x00blob", -7, 0), ("HMGET", "h", "f"),
                 ("SET", "x", 1.5), ("ECHO", "")]:
        assert scripting._pack(args) == b"".join(conn.pack_command(*args))
    with pytest.raises(TypeError):
        scripting._pack(("SET", "x", True))


def test_a_commit_right_after_redis_dropped_every_client_connects_again(redis_url, redis_sync):
    """Review finding: a held connection Redis closed (CLIENT KILL; a proxy or a restart does the same) was
    reused without a check when last used under a second ago, and the next commit failed. redis-py's pool
    checks every connection it hands out; the held ones are checked too once the loop has seen the close."""
    from flowcraft_cli.distributed.redis_store import RedisStore
    from flowcraft_cli.store import STATE

    async def go():
        redis = Redis.from_url(redis_url, socket_connect_timeout=3, health_check_interval=10)
        store = RedisStore(redis)

        async def write(t):
            t.put(STATE, "x", 1)

        try:
            await store.transact("held-kill", write)  # its connection is held now, idle
            redis_sync.client_kill_filter(_type="normal", skipme=True)  # an operator drops every client
            held = store._held._idle[0][0]
            deadline = asyncio.get_running_loop().time() + 10
            while not scripting._closed_by_server(held):  # until the event loop has seen the close
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.005)
            await store.transact("held-kill", write)  # well within a second of the last commit
        finally:
            await store.close()
            await redis.aclose()

    _run(go())


def test_redis_dropping_every_client_mid_chain_costs_no_step(redis_url, caplog):
    """End to end: a node drops every Redis client while a chain runs on a worker; the step's commit goes
    out on a held connection Redis closed. The run completes with no step handed back or left to recovery."""
    import logging

    import redis as sync_redis

    from tests.harness import make_adapter

    killer = sync_redis.Redis.from_url(redis_url)
    killed: list[int] = []

    def kill(ctx):
        if not killed:  # once: an operator's one CLIENT KILL
            killed.append(1)
            killer.client_kill_filter(_type="normal", skipme=True)
        return "killed"

    doc = "id: chain\nnodes:\n  - {id: a, uses: echo}\n  - {id: b, uses: kill}\n  - {id: c, uses: echo}\n" \
          "edges:\n  - {source: a, target: b}\n  - {source: b, target: c}\n"

    async def go():
        redis = Redis.from_url(redis_url, socket_connect_timeout=3, health_check_interval=10)
        w = make_adapter(redis, [doc], {"echo": lambda ctx: ctx.node_id, "kill": kill}, queue_name="kill-q",
                         worker_id="wk", concurrency=2)
        task = asyncio.ensure_future(w.start())
        run_id = await w.start_run("chain", {})
        deadline = asyncio.get_running_loop().time() + 30
        status = None
        while status is None:
            assert asyncio.get_running_loop().time() < deadline, "the run did not end"
            try:
                status = await w.status(run_id)
            except Exception:  # noqa: BLE001 - this client's own connection was dropped too
                pass
            await asyncio.sleep(0.02)
        w.stop()
        await task
        await w.close()
        await redis.aclose()
        return status

    with caplog.at_level(logging.WARNING, logger="flowcraft"):
        status = _run(go())
    killer.close()
    assert killed and status["status"] == "completed"
    assert not [r.getMessage() for r in caplog.records if "Redis error" in r.getMessage()]
