"""The hash-chained audit file (PROTOCOL.md §7): O(1) append, safe across processes.

Each line is the canonical JSON form (``schemas.canonical.dumps``) of one event plus
``\\n``. ``hash`` is the sha256 hex of the canonical form of the event *without*
``hash`` and ``event.hash`` (but with ``prev_hash``); ``prev_hash`` is the previous
line's ``hash``, 64 zeros on the first line. [v1.1] ECS names of the same values:
``event.hash`` = ``hash`` (it cannot be hashed into itself, so the hash leaves it out
and the readers check it equals ``hash``) and ``fedgate.prev_hash`` = ``prev_hash``
(hashed like any member); a line without them (written before v1.1) still verifies.
Editing, inserting, deleting or reordering a line therefore breaks the chain at that
line. (Removing trailing lines leaves a shorter, intact chain:
only an external copy — the SIEM's — of the last hash detects that; see docs/AUDIT.md.)

``event.sequence`` is the line's 1-based position in the file, set by the appender from
the last line (so it continues across restarts and processes); a consumer that receives
events more than once (the SIEM shipper is at-least-once) drops repeats by it.

Appending, in every process that shares the file (``append_many``: a whole batch at
once — group commit, issue 9):

1. take ``flock(LOCK_EX)`` on this process's own open file description (reopened
   after a ``fork`` and when the path now names another file);
2. the last line's hash and sequence: kept in memory after this process's own write
   and trusted only while the file's device, inode and size are still the ones it
   left (no other process appended, nobody rotated or cut it); else read the file
   backwards from its end, in blocks, until the last complete line, and check it ends
   with ``\\n`` and carries its own correct hash (else fail closed);
3. write the batch's lines with one ``os.write`` on an ``O_APPEND`` descriptor, one
   ``fsync``;
4. unlock. The lock is never held across more than one batch.

Lines are read back with :func:`schemas.canonical.load_stored`, the gateway's own
strict parser (PROTOCOL.md §3: one parser for every later reader), and a line that
parser would refuse (say an integer beyond 64 bits) is never written: the appender
checks its own line first, so the chain can never hold a line that stops the next
append or a SIEM. Cost per append is independent of the file's length. ``verify_file``
streams the file once: O(n) time, memory bounded by the longest line.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.canonical import (
    INVALID_UTF8,
    MALFORMED,
    NOT_OBJECT,
    CanonicalError,
    dumps,
    dumps_known_readable,
    load_stored,
)

__all__ = ["GENESIS", "SEQUENCE", "AuditError", "AuditLog", "VerifyResult", "event_hash",
           "head", "seal", "verify_file", "verify_lines"]

GENESIS = "0" * 64
SEQUENCE = "event.sequence"  # 1-based position of the line in its file
HASH_ECS, PREV_ECS = "event.hash", "fedgate.prev_hash"  # [v1.1] ECS names of hash/prev_hash
_CHAIN = ("prev_hash", "hash", SEQUENCE, HASH_ECS, PREV_ECS)
_BLOCK = 4096
_MAX_LINE = 1 << 20  # a longer "last line" is corruption, not an event
_HEX = frozenset("0123456789abcdef")


class AuditError(RuntimeError):
    """The audit file cannot be extended safely; nothing was written."""


def event_hash(event: dict[str, Any]) -> str:
    """sha256 hex of the canonical form of ``event`` without ``hash`` and ``event.hash``."""
    return hashlib.sha256(dumps({k: v for k, v in event.items()
                                 if k != "hash" and k != HASH_ECS})).hexdigest()


def seal(event: dict[str, Any], prev: str, sequence: int) -> dict[str, Any]:
    """``event`` as line ``sequence`` after the line hashed ``prev``: its chain members
    (any it had are replaced) under both names."""
    body = {k: v for k, v in event.items() if k not in _CHAIN}
    body["prev_hash"] = body[PREV_ECS] = prev
    body[SEQUENCE] = sequence
    body["hash"] = body[HASH_ECS] = event_hash(body)
    return body


def _aliases_agree(event: dict[str, Any]) -> str | None:
    """Why the ECS names of the chain members disagree with theirs, or None."""
    if event.get(HASH_ECS, event["hash"]) != event["hash"]:
        return f"{HASH_ECS} differs from hash: the line was edited"
    if event.get(PREV_ECS, event.get("prev_hash")) != event.get("prev_hash"):
        return f"{PREV_ECS} differs from prev_hash"
    return None


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _read_line(line: bytes) -> dict[str, Any]:
    """One audit line (newline stripped) with the one strict reader; ValueError(reason)."""
    try:
        return load_stored(line)
    except CanonicalError as exc:
        if exc.code == NOT_OBJECT:
            raise ValueError("not a JSON object") from None
        if exc.code in (MALFORMED, INVALID_UTF8):
            raise ValueError("not JSON") from None
        raise ValueError(f"not strict canonical JSON ({exc.code})") from None


def _read_block(fd: int, offset: int, length: int) -> bytes:
    """The one read of the append path (tests count calls here)."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise AuditError("audit file shrank while locked")
    return data


def _last_line(fd: int, size: int) -> bytes:
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


def _tail(fd: int) -> tuple[str, int]:
    """``hash`` and ``event.sequence`` of the last line, checked; (GENESIS, 0) when empty."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS, 0
    line = _last_line(fd, size)
    if not line.endswith(b"\n"):
        raise AuditError("audit file ends with a torn line (no newline): run "
                         "`fedgate audit verify` and repair it before appending")
    try:
        last = _read_line(line[:-1])
    except ValueError as exc:
        raise AuditError(f"last line of the audit file is {exc}") from None
    if not _is_hex64(last.get("hash")):
        raise AuditError("last line of the audit file has no well-formed hash")
    if event_hash(last) != last["hash"] or _aliases_agree(last):
        raise AuditError("last line of the audit file fails its own hash (edited)")
    if SEQUENCE not in last:  # a file written before event.sequence existed: count once
        return last["hash"], _count_lines(fd, size)
    if not _is_sequence(last[SEQUENCE]):
        raise AuditError(f"last line of the audit file has an ill-formed {SEQUENCE}")
    return last["hash"], last[SEQUENCE]


def head(fd: int) -> tuple[str, int, str | None]:
    """``hash``, ``event.sequence`` and ``event.action`` of the last line (checked);
    (GENESIS, 0, None) when the file is empty."""
    last_hash, seq = _tail(fd)
    if seq == 0:
        return last_hash, seq, None
    action = _read_line(_last_line(fd, os.fstat(fd).st_size)[:-1]).get("event.action")
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


class AuditLog:
    """Appends chained events to ``path``; one instance per process, thread-safe."""

    def __init__(self, path: Path | str, *, fsync: bool = True, checkpoints: Any = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.checkpoints = checkpoints  # an audit.checkpoints.Checkpointer, or None
        self._mutex = threading.Lock()  # flock does not exclude threads of one process
        self._fd: int | None = None
        self._pid = 0
        #: (st_dev, st_ino, size, last hash, last sequence) after this process's last write
        self._cache: tuple[int, int, int, str, int] | None = None
        self.batches = self.events = self.fsyncs = 0  # writes, lines and fsyncs made here
        self._open()

    def _open(self) -> None:
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._pid = os.getpid()
        if created and self.fsync:  # make the new directory entry durable too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _reopen(self) -> None:
        # closing a descriptor inherited over fork() keeps the parent's lock: it is the
        # parent's open file description, which only the parent ever unlocks
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._open()

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        cur = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)

    def _lock(self) -> int:
        """Hold ``LOCK_EX`` on the file the path names now; return its descriptor."""
        if self._fd is None:
            raise AuditError("audit log is closed")
        if self._pid != os.getpid():
            self._reopen()
        for _ in range(3):
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._is_current(fd):
                return fd
            fcntl.flock(fd, fcntl.LOCK_UN)  # rotated or removed meanwhile: follow the path
            self._reopen()
        raise AuditError(f"{self.path} keeps being replaced")

    @contextmanager
    def locked(self) -> Iterator[int]:
        """Hold this process's mutex and ``LOCK_EX`` on the current file; yield its fd."""
        with self._mutex:
            fd = self._lock()
            try:
                yield fd
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Chain ``event`` (:func:`seal`: any chain members it has are replaced) and
        write it; then a checkpoint if one is due (audit/checkpoints.py)."""
        (body,) = self.append_many([event])
        if isinstance(body, AuditError):
            raise body
        return body

    def append_many(self, events: list[dict[str, Any]]) -> list[dict[str, Any] | AuditError]:
        """Chain and write ``events`` in order, as one batch: one lock, one tail check,
        one write, one fsync (and a checkpoint line right after any event whose sequence
        makes one due). Returns each event's chained body, or the ``AuditError`` of an
        event the chain's readers would refuse (not written; the others are). Raises
        ``AuditError``/``OSError`` when the file cannot be extended: nothing written."""
        with self.locked() as fd:
            return self._append_batch(fd, events, self.checkpoints)

    def append_locked(self, fd: int, event: dict[str, Any]) -> dict[str, Any]:
        """:meth:`append` for a caller already inside :meth:`locked` (no checkpoint)."""
        (body,) = self._append_batch(fd, [event], None)
        if isinstance(body, AuditError):
            raise body
        return body

    def _head(self, fd: int) -> tuple[str, int, int]:
        """``(last hash, last sequence, size)``: from memory while the file is the one
        this process last wrote (same device, inode and size), else read and checked."""
        st = os.fstat(fd)
        if self._cache is not None and self._cache[:3] == (st.st_dev, st.st_ino, st.st_size):
            return self._cache[3], self._cache[4], st.st_size
        last_hash, seq = _tail(fd)
        return last_hash, seq, st.st_size

    def _append_batch(self, fd: int, events: list[dict[str, Any]],
                      checkpoints: Any) -> list[dict[str, Any] | AuditError]:
        last_hash, seq, size = self._head(fd)
        lines: list[bytes] = []
        out: list[dict[str, Any] | AuditError] = []
        signed: list[Any] = []  # checkpoints whose lines are in this batch

        def chain(event: dict[str, Any]) -> dict[str, Any] | AuditError:
            nonlocal last_hash, seq
            body = seal(event, last_hash, seq + 1)
            # never write what the chain's readers refuse: proven by one walk for a plain
            # event, else judged by reading the line back as they will
            line = dumps_known_readable(body)
            if line is None:
                line = dumps(body)
                try:
                    _read_line(line)
                except ValueError as exc:
                    return AuditError(f"event is {exc}; not written")
            lines.append(line + b"\n")
            last_hash, seq = body["hash"], seq + 1
            return body

        for event in events:
            body = chain(event)
            out.append(body)
            if checkpoints is not None and isinstance(body, dict) and (
                    due := checkpoints.line_after(body)) is not None:
                cp, cp_event = due
                cp_body = chain(cp_event)
                if isinstance(cp_body, AuditError):
                    raise cp_body
                signed.append(cp)
        if lines:
            data = b"".join(lines)
            self._write(fd, data, size)
            st = os.fstat(fd)
            self._cache = (st.st_dev, st.st_ino, size + len(data), last_hash, seq)
            self.batches += 1
            self.events += len(lines)
        if signed:
            checkpoints.sidecar(self, signed[-1])  # after the fsync, still locked
        return out

    def _write(self, fd: int, data: bytes, size: int) -> None:
        try:
            if os.write(fd, data) != len(data):
                raise AuditError("short write to the audit file")
            if self.fsync:
                os.fsync(fd)
                self.fsyncs += 1
        except BaseException:
            self._cache = None
            os.ftruncate(fd, size)  # never leave a torn line behind (still locked)
            raise

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _check_line(raw: bytes, prev: str, number: int | None = None) -> str:
    """The line's hash if it extends the chain after ``prev`` (as line ``number``, whose
    ``event.sequence``, when the line has one, must be ``number``); else ValueError."""
    if not raw.endswith(b"\n"):
        raise ValueError("torn line (no trailing newline): truncated or crashed write")
    event = _read_line(raw[:-1])
    if not _is_hex64(event.get("hash")):
        raise ValueError("missing or ill-formed hash")
    if not _is_hex64(event.get("prev_hash")):
        raise ValueError("missing or ill-formed prev_hash")
    if dumps(event) != raw[:-1]:
        raise ValueError("not in canonical form (rewritten or duplicate keys)")
    if event_hash(event) != event["hash"]:
        raise ValueError("hash mismatch: the line was edited")
    if (disagree := _aliases_agree(event)) is not None:
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
            prev = _check_line(raw, prev, start + number)
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
