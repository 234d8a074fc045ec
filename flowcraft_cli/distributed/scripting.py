"""Connections of its own for the step path's round trips: the commit script, and the read of a run's fields
before a step decides.

redis-py's client goes through its machinery on every call: a pool lock, a check that the connection has no
unread data (a non-blocking read), the retry wrapper, and for a pipeline its command stack. Measured on this
project's commit (a few keys, a msgpack program), that is about 55 µs of CPU a call where sending the packed
command on a held connection and reading its reply is about 30 µs; a chain step makes one such call, so the
client's bookkeeping was about a tenth of a worker's CPU.

Connections here come from the client's pool's factory (same URL, timeouts and parser) but are held by
this object: one per call in flight (up to ``MAX_HELD``; calls beyond go through the client's pool), kept
between calls. A connection that failed in any way (a timeout, a cancelled call, a dropped socket) is closed
and never reused, since its reply stream may be out of step; replies that are Redis errors leave it usable
(every reply of the call is read first). Before reuse, one that Redis has closed as far as the event loop has
seen (CLIENT KILL, a restart), or one idle for over a second, is checked the way redis-py checks every
connection it hands out, and connected again: a commit does not fail on a socket Redis dropped.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

_CHECK_AFTER_S = 1.0  # an idle connection older than this is checked before use
# at most this many connections held: a worker needs one per slot; a client starting runs from many tasks at
# once (a web server) goes through its own pool beyond that, bounded as that pool is configured
MAX_HELD = 16


class HeldConnections:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pool = redis.connection_pool
        self._idle: list[tuple[AbstractConnection, float]] = []  # (connection, when it was last used)
        self._open = 0  # connections made here and not closed (idle or in a call)
        self._closed = False

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA of a script registered on the client; loaded again if Redis lost it (a restart)."""
        try:
            return (await self.pipeline([("EVALSHA", script.sha, len(keys), *keys, *args)]))[0]
        except NoScriptError:
            return await script(keys=keys, args=args)  # (nothing ran: NOSCRIPT is refused before the script)

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The commands sent in one write, their replies in order; the first error reply is raised once every
        reply has been read."""
        if self._idle:
            conn, since = self._idle.pop()
        elif self._open >= MAX_HELD:
            async with self._redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return list(await pipe.execute())
        else:
            conn, since = self._pool.make_connection(), None
            self._open += 1
        try:
            await conn.connect()  # (returns at once when connected)
            if since is not None and (time.monotonic() - since > _CHECK_AFTER_S or _closed_by_server(conn)):
                await _ready(conn)
            await conn.send_packed_command(b"".join(_pack(c) for c in commands), check_health=False)
            replies: list[Any] = []
            error: ResponseError | None = None
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as e:
                    error = error or e
                    replies.append(e)
        except BaseException:
            await self._drop(conn)
            raise
        if self._closed:  # closed while this call ran: its connection is not kept
            await self._drop(conn)
        else:
            self._idle.append((conn, time.monotonic()))
        if error is not None:
            raise error
        return replies

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            await self._drop(self._idle.pop()[0])

    async def _drop(self, conn: AbstractConnection) -> None:
        self._open -= 1
        await conn.disconnect()


def _closed_by_server(conn: AbstractConnection) -> bool:
    """Has the event loop already seen Redis close this connection (CLIENT KILL, a restart, a proxy)? Free to
    ask (no system call), so asked before every reuse; a connection idle for longer gets redis-py's own check."""
    reader = getattr(conn, "_reader", None)  # redis-py's asyncio.StreamReader for the socket (None: not open)
    return reader is None or reader.at_eof()


async def _ready(conn: AbstractConnection) -> None:
    """What redis-py's pool does before it hands a connection out: one with unread data or a closed socket is
    connected again (a restarted Redis, an idle timeout)."""
    try:
        if await conn.can_read_destructive():
            raise ConnectionError("unread data on an idle connection")
    except (ConnectionError, OSError):
        await conn.disconnect()
        await conn.connect()


def _pack(args: Sequence[Any]) -> bytes:
    """One command in RESP, as redis-py packs it (strings as UTF-8, numbers in decimal), for the argument types
    the store sends; redis-py's own packer checks each argument's type against every type it knows first,
    which made it a twentieth of a worker's CPU."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            raw = arg.encode()
        elif isinstance(arg, bytes):
            raw = arg
        elif isinstance(arg, int) and not isinstance(arg, bool):
            raw = b"%d" % arg
        elif isinstance(arg, float):
            raw = repr(arg).encode()
        else:
            raise TypeError(f"cannot send a {type(arg).__name__} to Redis: {arg!r}")
        out += (b"$%d\r\n" % len(raw), raw, b"\r\n")
    return b"".join(out)
