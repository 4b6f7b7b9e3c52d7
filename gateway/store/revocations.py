"""Revoked producer keys in the shared store: the kill switch (PROTOCOL.md §8 v1.1).

``fedgate keys revoke KID`` writes the kid here and tells every gateway sharing the store;
each gateway keeps the whole set in memory and refuses those keys (401 ``key_not_valid``).
A revocation is final: it is never removed (re-issue the producer under a new kid), and
the first revocation's time and reason stand.

How a gateway learns of one, in two ways (gateway/http/killswitch.py re-reads the set on
either):

- **a change signal** (``revocation_signals``): Redis — a message on the pub/sub channel
  ``P:revocations`` (PUBLISH reaches every node of a Redis Cluster too), and every
  (re)subscription, which may have missed messages; SQLite (one host) — a poll of the
  table's highest row id every ``SQLITE_POLL_S``.
- **a periodic re-read** of the whole set (``[server] revocation_refresh_s``), so a lost
  message cannot leave a gateway trusting a revoked key for longer than that.

Layout: Redis hash ``P:{revocations}`` (its own hash tag: one slot, any cluster), field kid
→ ``{"revoked_at": …, "reason": …}``; SQLite table ``revocations`` (created here on first
use, so the store's own schema is untouched).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Mapping
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from common.sqlite import retry_locked

from .base import Revocation, StoreError

log = logging.getLogger("fedgate.store")

SQLITE_POLL_S = 0.25  # SQLite: how often the table is looked at for a new row
RESUBSCRIBE_S = (0.1, 2.0)  # Redis: first and longest wait before subscribing again
_SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS revocations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kid        TEXT NOT NULL UNIQUE,
    revoked_at INTEGER NOT NULL,
    reason     TEXT NOT NULL
);
"""


class SqliteRevocations:
    """For ``SqliteStore`` (uses its ``_run`` and ``_conn``)."""

    _revocations_ready = False

    def _revocations_table(self) -> sqlite3.Connection:
        db = self._conn()  # type: ignore[attr-defined]
        if not self._revocations_ready:
            retry_locked(lambda: db.executescript(_SQLITE_DDL),
                         self.busy_timeout_ms)  # type: ignore[attr-defined]
            self._revocations_ready = True
        return db

    async def revoke_key(self, kid: str, reason: str, now: int) -> Revocation:
        def revoke() -> Revocation:
            db = self._revocations_table()
            db.execute("INSERT OR IGNORE INTO revocations (kid, revoked_at, reason)"
                       " VALUES (?,?,?)", (kid, now, reason))  # autocommit: fsynced
            row = db.execute("SELECT revoked_at, reason FROM revocations WHERE kid=?",
                             (kid,)).fetchone()
            return Revocation(kid, row[0], row[1])
        return await self._run(revoke, stage="write")  # type: ignore[attr-defined]

    async def revoked_keys(self) -> Mapping[str, Revocation]:
        def read() -> dict[str, Revocation]:
            rows = self._revocations_table().execute(
                "SELECT kid, revoked_at, reason FROM revocations ORDER BY seq").fetchall()
            return {kid: Revocation(kid, at, reason) for kid, at, reason in rows}
        return await self._run(read, stage="claim")  # type: ignore[attr-defined]

    async def revocation_signals(self) -> AsyncIterator[None]:
        last: Any = object()
        while True:
            try:
                seq = await self._run(  # type: ignore[attr-defined]
                    lambda: self._revocations_table().execute(
                        "SELECT max(seq) FROM revocations").fetchone()[0], stage="claim")
            except StoreError:
                seq = last  # the periodic re-read reports the outage
            if seq != last:
                last = seq
                yield
            await asyncio.sleep(SQLITE_POLL_S)


class RedisRevocations:
    """For ``RedisStore`` (uses its ``prefix``, ``url``, ``socket_timeout`` and ``_call``)."""

    def _revocations_key(self) -> str:
        return f"{self.prefix}:{{revocations}}"  # type: ignore[attr-defined]

    def _revocations_channel(self) -> str:
        return f"{self.prefix}:revocations"  # type: ignore[attr-defined]

    async def revoke_key(self, kid: str, reason: str, now: int) -> Revocation:
        key, value = self._revocations_key(), json.dumps({"revoked_at": now, "reason": reason})
        call = self._call  # type: ignore[attr-defined]
        await call(lambda r: r.hsetnx(key, kid, value), refused="write")
        stored = await call(lambda r: r.hget(key, kid))
        await call(lambda r: r.publish(self._revocations_channel(), kid))
        return _decode(kid, stored)

    async def revoked_keys(self) -> Mapping[str, Revocation]:
        key = self._revocations_key()
        raw = await self._call(lambda r: r.hgetall(key))  # type: ignore[attr-defined]
        return {k.decode(): _decode(k.decode(), v) for k, v in raw.items()}

    async def revocation_signals(self) -> AsyncIterator[None]:
        """One subscriber connection of its own, subscribed again whenever it is lost; each
        (re)subscription is a signal too (messages may have gone by meanwhile)."""
        wait, lost = RESUBSCRIBE_S[0], False
        while True:
            client = Redis.from_url(
                self.url, socket_connect_timeout=self.socket_timeout,  # type: ignore[attr-defined]
                socket_timeout=None, retry=Retry(NoBackoff(), 0))
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._revocations_channel())
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") in ("subscribe", "message"):
                        if lost:  # one line for the way back, none per retry meanwhile
                            log.info("revocation channel subscribed again")
                        wait, lost = RESUBSCRIBE_S[0], False
                        yield
            except (RedisError, OSError) as exc:
                if not lost:  # one line per outage (the store's own failures are logged
                    # by the requests that meet them)
                    log.warning("revocation channel lost (%s: %s); subscribing again every "
                                "%.1f-%.0f s; the periodic re-read still applies",
                                type(exc).__name__, exc, RESUBSCRIBE_S[0], RESUBSCRIBE_S[1])
                lost = True
            finally:
                await pubsub.aclose()
                await client.aclose()
            await asyncio.sleep(wait)
            wait = min(wait * 2, RESUBSCRIBE_S[1])


def _decode(kid: str, raw: bytes | None) -> Revocation:
    try:
        doc = json.loads(raw) if raw is not None else {}
        return Revocation(kid, int(doc.get("revoked_at", 0)), str(doc.get("reason", "")))
    except (ValueError, TypeError, AttributeError):  # unreadable: still revoked
        return Revocation(kid, 0, "")
