"""The group commit's lean RESP writer (gateway/store/resp.py) against a real redis-server.

``pack`` must write exactly what redis-py's own ``pack_command`` writes (big values,
UTF-8, negative and 64-bit integers, empty strings), refuse what redis-py refuses (bool,
None, floats are not used by the store: refused rather than guessed), and
``round_trip`` must return every reply in order, error replies in place, and never let a
failed round trip's late replies answer a later command.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from gateway.store.resp import HeldConnections, pack, round_trip

ARGS = [
    ["PING"],
    ["SET", "k", b"v"],
    ["EVALSHA", "a" * 40, 2, "fg:{t}:n:x", "fg:{t}:r:y", -1, 0, 2**63 - 1, -(2**63)],
    ["SET", "big", b"\x00\r\n" * 20_000],  # past redis-py's buffer cutoff: chunked there
    ["SET", "ütf-8 ✓", "välue ☃"],
    ["SET", "", b""],
]


@pytest.mark.parametrize("args", ARGS, ids=range(len(ARGS)))
def test_pack_writes_what_redis_py_writes(args):
    assert pack(args) == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("bad", [True, None, 1.5, bytearray(b"x"), ["x"]])
def test_pack_refuses_what_it_cannot_encode_exactly(bad):
    with pytest.raises(TypeError, match="bytes, str or int"):
        pack(["SET", "k", bad])


async def test_round_trip_returns_every_reply_in_order_errors_in_place(redis_url):
    client = Redis.from_url(redis_url)
    try:
        payload = b"".join(pack(c) for c in (
            ["SET", "n", "text"], ["INCR", "n"], ["EVALSHA", "0" * 40, 0], ["GET", "n"],
            ["SET", "big", b"\x00" * 100_000], ["STRLEN", "big"]))
        replies = await round_trip(client, payload, 6)
        assert replies[0] is True or replies[0] == b"OK"
        assert isinstance(replies[1], ResponseError) and "not an integer" in str(replies[1])
        assert isinstance(replies[2], NoScriptError)
        assert replies[3:] == [b"text", b"OK", 100_000]
        assert await client.get("n") == b"text"  # the pool's connection is in sync
    finally:
        await client.aclose()


async def test_a_failed_round_trip_never_answers_a_later_command(redis_url):
    """A read that times out leaves its reply in flight: that connection must not serve
    the next command (it would read the stale reply as its own)."""
    client = Redis.from_url(redis_url, socket_timeout=0.3, max_connections=1)
    try:
        slow = pack(["BLPOP", "nothing", 1])  # answers nil after 1 s
        with pytest.raises(RedisTimeout):
            await round_trip(client, slow, 1)
        await asyncio.sleep(1.2)  # the nil reply has arrived by now
        assert await round_trip(client, pack(["ECHO", "mine"]), 1) == [b"mine"]
        assert await client.echo("again") == b"again"
    finally:
        await client.aclose()


async def test_a_cancelled_round_trip_never_answers_a_later_command(redis_url):
    client = Redis.from_url(redis_url, max_connections=1)
    try:
        task = asyncio.create_task(round_trip(client, pack(["BLPOP", "nothing", 1]), 1))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.1)  # BLPOP's nil reply has arrived on that connection
        assert await round_trip(client, pack(["ECHO", "mine"]), 1) == [b"mine"]
    finally:
        await client.aclose()


# -- HeldConnections: the group round trips' connections, kept between round trips ------

async def test_held_connections_serve_round_trips_on_one_kept_connection(redis_url):
    client = Redis.from_url(redis_url, max_connections=4)
    held = HeldConnections(client.connection_pool, keep=1)
    try:
        first = await held.round_trip(pack(["CLIENT", "ID"]), 1)
        for _ in range(5):
            assert await held.round_trip(pack(["CLIENT", "ID"]), 1) == first
        assert await client.echo("pool") == b"pool"  # the pool still lends the others
    finally:
        await held.close()
        await client.aclose()


async def test_a_kept_connection_the_server_closed_is_connected_again(redis_url):
    """Checked before use as the pool checks what it lends: a connection killed while
    kept answers nothing stale and fails no round trip."""
    client = Redis.from_url(redis_url, max_connections=2)
    held = HeldConnections(client.connection_pool, keep=1)
    try:
        [kept] = await held.round_trip(pack(["CLIENT", "ID"]), 1)
        assert await client.client_kill_filter(_id=kept) == 1
        await asyncio.sleep(0.1)
        [now] = await held.round_trip(pack(["CLIENT", "ID"]), 1)
        assert now != kept
        assert await held.round_trip(pack(["ECHO", "mine"]), 1) == [b"mine"]
    finally:
        await held.close()
        await client.aclose()


async def test_a_failed_held_round_trip_goes_back_to_the_pool_disconnected(redis_url):
    client = Redis.from_url(redis_url, socket_timeout=0.3, max_connections=1)
    held = HeldConnections(client.connection_pool, keep=1)
    try:
        with pytest.raises(RedisTimeout):
            await held.round_trip(pack(["BLPOP", "nothing", 1]), 1)
        # not kept: with one connection in the pool, the client gets it (it would wait
        # for it, then fail, if the failed connection had stayed here)
        await asyncio.sleep(1.2)  # the nil reply has arrived on that connection
        assert await client.echo("again") == b"again"
        assert await held.round_trip(pack(["ECHO", "mine"]), 1) == [b"mine"]
    finally:
        await held.close()
        await client.aclose()


async def test_held_connections_keep_at_most_keep_and_give_them_back_on_close(redis_url):
    """A burst takes what it needs from the pool; afterwards only ``keep`` stay held, so
    the pool's other users are never starved; ``close`` gives those back too."""
    client = Redis.from_url(redis_url, max_connections=3, socket_timeout=2)
    pool = client.connection_pool
    held = HeldConnections(pool, keep=1)
    try:
        await asyncio.gather(*(held.round_trip(pack(["BLPOP", "nothing", "0.2"]), 1)
                               for _ in range(3)))
        assert len(pool._in_use_connections) == 1  # the one kept
        assert await asyncio.gather(client.echo("a"), client.echo("b")) == [b"a", b"b"]
        await held.close()
        assert not pool._in_use_connections
        await held.round_trip(pack(["PING"]), 1)  # after close: lent by the pool, given back
        assert not pool._in_use_connections
    finally:
        await client.aclose()
