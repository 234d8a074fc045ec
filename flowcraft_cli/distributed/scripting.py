"""A Lua script called on connections of its own: the commit path's one round trip per step.

redis-py's ``Script.__call__`` goes through the client's machinery on every call: a pool lock, a check that
the connection has no unread data (a non-blocking read), the retry wrapper, then EVALSHA. Measured on this
project's commit (a few keys, a msgpack program), that is about 55 µs of CPU a call where sending the packed
command on a held connection and reading its reply is about 30 µs; a chain step makes one such call, so
the client's bookkeeping was about a tenth of a worker's CPU a step.

Connections here come from the client's pool's factory (same URL, timeouts and parser) but are held by
this object: one per call in flight, kept between calls. A connection that failed in any way (a timeout,
a cancelled call, a dropped socket) is closed and never reused, since its reply stream may be out of step;
a reply that is a Redis error leaves it usable. One idle for a while is checked the way redis-py checks
every connection it hands out (a server restart or an idle timeout closes it), so a quiet worker's first
commit does not fail on a socket Redis dropped long ago.
"""
from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

_CHECK_AFTER_S = 1.0  # an idle connection older than this is checked before use


class HeldScript:
    def __init__(self, redis: Redis, source: str) -> None:
        self._script = redis.register_script(source)  # its SHA, and the path that loads it on NOSCRIPT
        self._pool = redis.connection_pool
        self._idle: list[tuple[AbstractConnection, float]] = []  # (connection, when it was last used)

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        conn, since = self._idle.pop() if self._idle else (self._pool.make_connection(), None)
        try:
            await conn.connect()  # (returns at once when connected)
            if since is not None and time.monotonic() - since > _CHECK_AFTER_S:
                await _ready(conn)
            command = conn.pack_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
            await conn.send_packed_command(command, check_health=False)
            reply = await conn.read_response()
        except NoScriptError:
            self._idle.append((conn, time.monotonic()))
            return await self._script(keys=keys, args=args)  # Redis lost its scripts (a restart): load it again
        except ResponseError:
            self._idle.append((conn, time.monotonic()))  # an error reply: the stream is in step
            raise
        except BaseException:
            await conn.disconnect()
            raise
        self._idle.append((conn, time.monotonic()))
        return reply

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop()[0].disconnect()


async def _ready(conn: AbstractConnection) -> None:
    """What redis-py's pool does before it hands a connection out: one with unread data or a closed socket is
    connected again (a restarted Redis, an idle timeout)."""
    try:
        if await conn.can_read_destructive():
            raise ConnectionError("unread data on an idle connection")
    except (ConnectionError, OSError):
        await conn.disconnect()
        await conn.connect()
