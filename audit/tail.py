"""The last line of an audit file, read backwards from its end: where the next append goes.

Step 2 of appending (audit/chain.py): the last line's hash and sequence, read in blocks
from the end until the last complete line, so the cost does not grow with the file.
That line must end with ``\\n`` and carry its own correct hash, else the appender fails
closed (``AuditError``): it never chains onto a line it cannot trust. Rotation and
checkpoints read the head here too.
"""

from __future__ import annotations

import os
from typing import Any

from audit.seal import GENESIS, SEQUENCE, aliases_agree, event_hash, is_hex64, read_line

_BLOCK = 4096
_MAX_LINE = 1 << 20  # a longer "last line" is corruption, not an event


class AuditError(RuntimeError):
    """The audit file cannot be extended safely; nothing was written."""


def _read_block(fd: int, offset: int, length: int) -> bytes:
    """The one read of the append path (tests count calls here)."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise AuditError("audit file shrank while locked")
    return data


def last_line(fd: int, size: int) -> bytes:
    """The file's last line, newline included, reading only the tail."""
    buf, pos = b"", size
    while True:
        start = max(0, pos - _BLOCK)
        buf = _read_block(fd, start, pos - start) + buf
        pos = start
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1:]
        if pos == 0:
            return buf
        if len(buf) > _MAX_LINE:
            raise AuditError(f"last line of the audit file exceeds {_MAX_LINE} bytes")


def read_tail(fd: int) -> tuple[str, int]:
    """``hash`` and ``event.sequence`` of the last line, checked; (GENESIS, 0) when empty."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS, 0
    line = last_line(fd, size)
    if not line.endswith(b"\n"):
        raise AuditError("audit file ends with a torn line (no newline): run "
                         "`fedgate audit verify` and repair it before appending")
    try:
        last = read_line(line[:-1])
    except ValueError as exc:
        raise AuditError(f"last line of the audit file is {exc}") from None
    if not is_hex64(last.get("hash")):
        raise AuditError("last line of the audit file has no well-formed hash")
    if event_hash(last) != last["hash"] or aliases_agree(last):
        raise AuditError("last line of the audit file fails its own hash (edited)")
    if SEQUENCE not in last:  # a file written before event.sequence existed: count once
        return last["hash"], _count_lines(fd, size)
    if not _is_sequence(last[SEQUENCE]):
        raise AuditError(f"last line of the audit file has an ill-formed {SEQUENCE}")
    return last["hash"], last[SEQUENCE]


def head(fd: int) -> tuple[str, int, str | None]:
    """``hash``, ``event.sequence`` and ``event.action`` of the last line (checked);
    (GENESIS, 0, None) when the file is empty."""
    last_hash, seq = read_tail(fd)
    if seq == 0:
        return last_hash, seq, None
    action = read_line(last_line(fd, os.fstat(fd).st_size)[:-1]).get("event.action")
    return last_hash, seq, action if isinstance(action, str) else None


def _is_sequence(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _count_lines(fd: int, size: int) -> int:
    count, offset = 0, 0
    while offset < size:
        block = os.pread(fd, min(1 << 20, size - offset), offset)
        if not block:
            break
        count += block.count(b"\n")
        offset += len(block)
    return count
