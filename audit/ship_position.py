"""Where the audit shipper is in the audit file, and the checked lines after that point.

The position is a small state file naming the last line the receiver *has*: ``{"offset",
"sequence", "hash"}``, replaced durably only after a delivery is confirmed
(audit/shipper.py). :class:`ChainReader` reads the complete lines after it under
``flock(LOCK_SH)`` and checks each against the chain, so a forged or edited line is never
forwarded; it also notices that the file was replaced, and a rotated-to file whose first
line continues the chain (:func:`rotated_anchor`).
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.seal import GENESIS, SEQUENCE, is_hex64, read_line
from audit.tail import last_line
from audit.verify import check_line
from common.files import replace_durably

CHUNK = 4 << 20  # bytes read per round at most (a line is at most 1 MiB)


class ShipError(RuntimeError):
    """The shipper cannot continue safely (broken chain, replaced file, bad state)."""


@dataclass(frozen=True, slots=True)
class ShipState:
    """The last line the receiver has: end offset, its sequence and hash."""

    offset: int = 0
    sequence: int = 0
    hash: str = GENESIS

    @classmethod
    def load(cls, path: Path) -> ShipState:
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ShipError(f"{path}: unreadable ship state ({exc})") from None
        ok = isinstance(raw, dict) and all(
            isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool) and raw[k] >= 0
            for k in ("offset", "sequence")) and is_hex64(raw.get("hash"))
        if not ok:
            raise ShipError(f"{path}: malformed ship state")
        return cls(raw["offset"], raw["sequence"], raw["hash"])

    def save(self, path: Path) -> None:
        replace_durably(path, json.dumps({"offset": self.offset, "sequence": self.sequence,
                                          "hash": self.hash}).encode() + b"\n")


@dataclass(frozen=True, slots=True)
class Entry:
    line: bytes  # the audit line without its newline
    event: dict[str, Any]
    state: ShipState  # the state once this line is delivered


class ChainReader:
    """Complete, chain-checked lines of the audit file after a given state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def check_position(self, state: ShipState) -> None:
        """The line ending at ``state.offset`` must be the one recorded (same hash)."""
        if state.offset == 0:
            return
        size = os.fstat(self.fd).st_size
        last = last_line(self.fd, state.offset) if state.offset <= size else b""
        try:
            found = read_line(last[:-1]).get("hash") if last.endswith(b"\n") else None
        except ValueError:
            found = None
        if found != state.hash:
            raise ShipError(f"{self.path} does not hold the shipped line {state.sequence} at "
                            f"byte {state.offset} (file replaced, truncated or edited)")

    def read(self, state: ShipState, limit: int) -> tuple[list[Entry], int]:
        """Up to ``limit`` entries after ``state``, and the sequence of the file's last line."""
        fcntl.flock(self.fd, fcntl.LOCK_SH)  # appends hold LOCK_EX until fsync'd
        try:
            size = os.fstat(self.fd).st_size
            data = os.pread(self.fd, min(size - state.offset, CHUNK), state.offset)
            tail = last_line(self.fd, size) if size else b""
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        entries, offset, seq, prev = [], state.offset, state.sequence, state.hash
        if state == ShipState() and (anchor := rotated_anchor(data)) is not None:
            prev, seq = anchor  # a fresh state on a rotated-to file: start at its first line
        for raw in _lines(data, limit):
            try:
                prev = check_line(raw, prev, seq + 1)
            except ValueError as exc:
                raise ShipError(f"{self.path}: line {seq + 1}: {exc}; not shipping past it") \
                    from None
            seq, offset = seq + 1, offset + len(raw)
            entries.append(Entry(raw[:-1], read_line(raw[:-1]), ShipState(offset, seq, prev)))
        return entries, _tail_sequence(tail, seq)

    def replaced(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        cur = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) != (cur.st_dev, cur.st_ino)


def rotated_anchor(data: bytes) -> tuple[str, int] | None:
    """(prev_hash, sequence - 1) of ``data``'s first line when it is ``audit.rotated``
    (the first line of a file `fedgate audit rotate` started: the chain continues)."""
    first = _lines(data, 1)
    try:
        event = read_line(first[0][:-1]) if first else None
    except ValueError:
        return None
    if not event or event.get("event.action") != "audit.rotated":
        return None
    prev, seq = event.get("prev_hash"), event.get(SEQUENCE)
    ok = is_hex64(prev) and isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1
    return (prev, seq - 1) if ok else None


def _lines(data: bytes, limit: int) -> list[bytes]:
    """Up to ``limit`` complete lines (newline kept); a last line without one is left for
    later (being written, or torn by a crash: appends refuse to continue after it)."""
    out, start = [], 0
    while len(out) < limit:
        end = data.find(b"\n", start)
        if end < 0:
            break
        out.append(data[start:end + 1])
        start = end + 1
    return out


def _tail_sequence(tail: bytes, fallback: int) -> int:
    try:
        value = read_line(tail[:-1]).get(SEQUENCE) if tail.endswith(b"\n") else None
    except ValueError:
        value = None
    return value if isinstance(value, int) and value >= fallback else fallback

