"""Which events are already in the hash chain: start-up recovery of the audit outbox
(docs/AUDIT.md *Outbox*).

After a crash, an owner's outbox may hold events that reached the chain (the process
died before acknowledging them) and events that did not (it died before appending).
:func:`find_event_ids` tells them apart by ``event.id`` (unique per event), reading the
audit file **backwards from its end** and stopping as soon as every id is found or the
lines are older than ``since`` (so the cost is the recent tail, not the whole file;
only an event that never reached the chain makes it read back to ``since``). At the
start of a rotated-to file it goes on in the file it was rotated from
(``audit.rotated_from``), still bounded by ``since``.

A line that is not JSON (a torn last line) is skipped: the appender refuses to extend
such a file anyway, and ``fedgate audit verify`` names it.
"""

from __future__ import annotations

import calendar
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from audit.events import rfc3339_ms

__all__ = ["MARGIN_S", "find_event_ids", "oldest_minus"]

MARGIN_S = 300  # an event is appended well within this of its @timestamp
_BLOCK = 1 << 16
ROTATED = "audit.rotated"


def oldest_minus(timestamps: Iterable[object], margin_s: float = MARGIN_S) -> str | None:
    """The earliest RFC 3339 ``@timestamp`` among ``timestamps`` minus ``margin_s``, in
    the same form (they compare as strings); None when none is well-formed."""
    best = None
    for ts in timestamps:
        if isinstance(ts, str) and len(ts) >= 20:
            try:
                secs = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                continue
            best = secs if best is None else min(best, secs)
    return None if best is None else rfc3339_ms(max(0, best - margin_s))


def _backwards(path: Path) -> Iterator[bytes]:
    """The file's lines, last first (without newlines; empty lines skipped)."""
    with open(path, "rb") as f:
        pos, rest = os.fstat(f.fileno()).st_size, b""
        while pos > 0:
            start = max(0, pos - _BLOCK)
            f.seek(start)
            parts = (f.read(pos - start) + rest).split(b"\n")
            pos, rest = start, parts[0]
            yield from (line for line in reversed(parts[1:]) if line)
        if rest:
            yield rest


def find_event_ids(path: Path | str, ids: set[str], since: str | None) -> set[str]:
    """The members of ``ids`` that are the ``event.id`` of a line of ``path`` (or of the
    files it was rotated from), looking back no further than ``since`` (@timestamp)."""
    found: set[str] = set()
    current: Path | None = Path(path)
    while current is not None and current.exists() and found != ids:
        first, older = None, False
        for raw in _backwards(current):
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            first = event
            if event.get("event.id") in ids:
                found.add(event["event.id"])
                if found == ids:
                    return found
            ts = event.get("@timestamp")
            if since is not None and isinstance(ts, str) and ts < since:
                older = True
                break
        rotated = first.get("audit.rotated_from") if first is not None else None
        current = (current.parent / rotated if not older and isinstance(rotated, str)
                   and first.get("event.action") == ROTATED and "/" not in rotated else None)
    return found
