"""The connection guard's limits (gateway/http/conn.py), fitted to the open-files limit."""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fedgate.conn")

# Descriptors kept free besides the connections and two accept batches: stdio, the
# listening socket, the audit file, SQLite (db, -wal, -shm), the Redis pool, imports.
RESERVED_FDS = 64
MAX_BACKLOG = 1024
# The slowest body accepted: a body gets header_timeout_s plus its Content-Length at this
# rate (never more than the application's own cap, clock_skew_s clamped to 1-30 s).
MIN_BODY_RATE = 16 * 1024  # bytes per second


@dataclass(frozen=True, slots=True)
class Limits:
    handshake_timeout_s: float
    header_timeout_s: float
    idle_timeout_s: float
    max_connections: int  # the cap in force (already fitted to the open-files limit)
    backlog: int
    per_identity: int = 1 << 30  # requests one identity may hold (reading or decided)

    def body_seconds(self, content_length: int | None, cap_s: float) -> float:
        """How long a body may take to arrive: scaled to its Content-Length with a floor
        of header_timeout_s, at most ``cap_s`` (and exactly that for a chunked body)."""
        if content_length is None:
            return cap_s
        return min(cap_s, self.header_timeout_s + content_length / MIN_BODY_RATE)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or want <= soft:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


def fit_limits(server: Any, fd_limit: int) -> Limits:
    """``server`` is ``ServerSettings``. The accept backlog is also how many sockets asyncio
    accepts in one batch before any is seen here (and a shed socket's descriptor is freed
    one loop iteration later): two batches (at most cap / 2) are kept as headroom."""
    room = (fd_limit - RESERVED_FDS) * 2 // 3  # the rest: up to two accept batches
    if room < 16:
        raise ValueError(f"the open-files limit ({fd_limit}) is too low to serve: "
                         f"raise `ulimit -n` (hard) above {RESERVED_FDS + 24}")
    cap = min(server.max_connections, room)
    if cap < server.max_connections:
        log.warning("server.max_connections = %d lowered to %d to stay below the "
                    "open-files limit (%d)", server.max_connections, cap, fd_limit)
    # A batch smaller than the cap: a producer's new socket then lives through the
    # batch that follows it (long enough for its ClientHello to be read) before it
    # could be the oldest silent one.
    backlog = min(MAX_BACKLOG, max(8, cap // 4))
    per_identity = max(1, int(cap * server.identity_share))
    return Limits(server.handshake_timeout_s, server.header_timeout_s,
                  server.idle_timeout_s, cap, backlog, per_identity)
