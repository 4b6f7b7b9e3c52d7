"""Checking audit lines against the chain, apart from the appender that writes them.

``check_line`` is the one rule for a line: canonical, its own correct hash (and agreeing
ECS aliases), continuing the line before it, at its ``event.sequence``; ``fedgate audit
verify`` (audit/coverage.py) and the shipper walk with it. ``verify_file`` streams one
file once: O(n) time, memory bounded by the longest line; the first break stops the walk
and says which line and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from audit.seal import GENESIS, SEQUENCE, aliases_agree, event_hash, is_hex64, read_line
from schemas.canonical import dumps


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """``lines``: intact lines before the first bad one (all of them when ``ok``)."""

    ok: bool
    lines: int
    first_bad_line: int | None = None
    reason: str | None = None
    last_hash: str = GENESIS  # hash of the last intact line: anchor it elsewhere

    def __str__(self) -> str:
        if self.ok:
            return f"intact: {self.lines} lines, last hash {self.last_hash}"
        where = f"line {self.first_bad_line}: " if self.first_bad_line else ""
        return f"broken: {where}{self.reason}"


def check_line(raw: bytes, prev: str, number: int | None = None) -> str:
    """The line's hash if it extends the chain after ``prev`` (as line ``number``, whose
    ``event.sequence``, when the line has one, must be ``number``); else ValueError."""
    if not raw.endswith(b"\n"):
        raise ValueError("torn line (no trailing newline): truncated or crashed write")
    event = read_line(raw[:-1])
    if not is_hex64(event.get("hash")):
        raise ValueError("missing or ill-formed hash")
    if not is_hex64(event.get("prev_hash")):
        raise ValueError("missing or ill-formed prev_hash")
    if dumps(event) != raw[:-1]:
        raise ValueError("not in canonical form (rewritten or duplicate keys)")
    if event_hash(event) != event["hash"]:
        raise ValueError("hash mismatch: the line was edited")
    if (disagree := aliases_agree(event)) is not None:
        raise ValueError(disagree)
    if event["prev_hash"] != prev:
        raise ValueError("prev_hash does not match the previous line: a line was "
                         "inserted, deleted or moved")
    if number is not None and SEQUENCE in event and event[SEQUENCE] != number:
        raise ValueError(f"{SEQUENCE} is {event[SEQUENCE]!r}, not the line's position "
                         f"{number}")
    return event["hash"]


def verify_lines(lines: Iterable[bytes], prev: str = GENESIS, start: int = 0) -> VerifyResult:
    """Walk the chain over ``lines`` (each with its newline); stop at the first break.
    ``prev``/``start``: the hash and sequence the first line continues (a rotated file)."""
    count = 0
    for number, raw in enumerate(lines, start=1):
        try:
            prev = check_line(raw, prev, start + number)
        except ValueError as exc:
            return VerifyResult(False, count, number, str(exc), prev)
        count += 1
    return VerifyResult(True, count, None, None, prev)


def verify_file(path: Path | str) -> VerifyResult:
    """Check the whole chain of ``path`` in one streaming pass (an empty file is intact)."""
    try:
        with open(path, "rb") as f:
            return verify_lines(f)
    except OSError as exc:
        return VerifyResult(False, 0, None, f"cannot read {path}: {exc.strerror or exc}")
