"""A lean RESP writer for the group commit's pipeline (issue 9).

redis-py packs every argument through its ``Encoder`` and chunking logic: ~90-170 µs for
one commit's EVALSHA (about 55 arguments: keys, the record, the audit events, the fold),
more than the script takes to run in Redis. :func:`pack` writes the same bytes (a RESP
array of bulk strings, as ``Connection.pack_command`` would) in ~20 µs, and
:func:`round_trip` sends a whole group's commands in one write on one pooled connection
(:class:`HeldConnections`: on one kept between round trips; :func:`exchange`: on a
connection the caller holds, a cluster node's) and reads one
reply per command through redis-py's own parser (replies, error replies and their
exception classes unchanged).

Only ``bytes``, ``str`` (UTF-8) and ``int`` arguments, exactly: anything else is a
programming error (``TypeError``), never a guess at an encoding. A connection a round
trip failed on (timeout, lost socket, cancel mid-read) is disconnected before it goes
back to the pool: its unread replies must never answer a later command.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["HeldConnections", "exchange", "pack", "round_trip"]
KEEP = 2  # connections HeldConnections keeps between round trips


def pack(args: Sequence[bytes | str | int]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d" % len(args)]
    add = parts.append
    for arg in args:
        kind = type(arg)
        if kind is str:
            arg = arg.encode()
        elif kind is int:
            arg = b"%d" % arg
        elif kind is not bytes:
            raise TypeError(f"a Redis argument must be bytes, str or int, not {kind.__name__}")
        add(b"$%d" % len(arg))
        add(arg)
    add(b"")
    return b"\r\n".join(parts)


async def round_trip(client: Redis, payload: bytes, replies: int) -> list:
    """Send ``payload`` (``replies`` packed commands) on one pooled connection and read
    each command's reply in order (:func:`exchange`)."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        return await exchange(conn, payload, replies)
    finally:
        await pool.release(conn)


class HeldConnections:
    """Connections of ``pool`` kept between the group round trips (issue 9).

    Taking a connection from redis-py's pool and giving it back costs more CPU than
    packing a group of ten commits (its lock, condition, timeout and observability
    hooks: ~14 % of a one-commit round trip, py-spy). Up to ``keep`` connections stay
    here between round trips instead; the pool lends the rest to everything else, and
    a burst beyond ``keep`` takes and returns the pool's as :func:`round_trip` does.

    A kept connection is checked before each use: one the server closed while it was
    kept (a restart, ``CLIENT KILL``, an idle timeout) or that holds unread bytes is
    connected again, so the round trip does not fail on it. (redis-py 8's pool skips
    that check while its maintenance notifications are on, its default: a pooled
    connection the server closed fails the next command sent on it.) One a round trip
    failed on was disconnected by :func:`exchange` and goes back to the pool, never back
    here. ``close`` gives them all back."""

    def __init__(self, pool: ConnectionPool, keep: int = KEEP) -> None:
        self.pool, self.keep = pool, keep
        self._idle: list[Connection] = []
        self._closed = False

    async def round_trip(self, payload: bytes, replies: int) -> list:
        """As :func:`round_trip`, on a kept connection when one is free."""
        if self._idle:
            conn = self._idle.pop()
            try:  # closed by the server, or holding bytes nobody asked for: a new socket
                stale = await conn.can_read()
            except (RedisError, OSError):
                stale = True
            if stale:
                await conn.disconnect()  # exchange's send connects it again
        else:
            conn = await self.pool.get_connection()
        done = False
        try:
            out = await exchange(conn, payload, replies)
            done = True
            return out
        finally:
            if done and not self._closed and len(self._idle) < self.keep:
                self._idle.append(conn)
            else:
                await self.pool.release(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.pool.release(conn)


async def exchange(conn: Connection, payload: bytes, replies: int) -> list:
    """Send ``payload`` on ``conn`` (taken by the caller from a pool or a cluster node)
    and read each command's reply in order; an error reply is returned as its exception
    (``ResponseError`` or a subclass such as ``NoScriptError``, ``MovedError``), not
    raised. Connection failures and timeouts raise redis-py's exceptions, as its own
    pipeline does, after disconnecting ``conn``."""
    try:
        await conn.send_packed_command(payload)
        out: list = []
        # one deadline for all the replies (socket_timeout, as redis-py's per read), not
        # a timer per reply: a group of 100 replies would arm and cancel 100 of them
        try:
            async with asyncio.timeout(conn.socket_timeout):
                for _ in range(replies):
                    try:
                        out.append(await conn.read_response(timeout=math.inf))
                    except ResponseError as exc:
                        out.append(exc)
        except TimeoutError:
            raise RedisTimeoutError(f"Timeout reading {replies} replies") from None
        return out
    except BaseException:
        await conn.disconnect()  # replies may still be on their way: never reuse it
        raise
