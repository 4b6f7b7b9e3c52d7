"""The hash-chained audit file (PROTOCOL.md §7): O(1) append, safe across processes.

What a line is and how it is hashed lives in audit/seal.py; reading the last line back,
in audit/tail.py; checking a whole chain, in audit/verify.py. This module is the writer.

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

A line the strict reader (``schemas.canonical.load_stored``) would refuse (say an
integer beyond 64 bits) is never written: the appender checks its own line first, so
the chain can never hold a line that stops the next append or a SIEM. Cost per append
is independent of the file's length.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from audit.seal import SEQUENCE, event_hash, read_line, seal
from audit.tail import AuditError, read_tail
from schemas.canonical import dumps, dumps_known_readable

# SEQUENCE and event_hash: re-exported for the tests that reach them as chain.*
__all__ = ["SEQUENCE", "AuditError", "AuditLog", "event_hash", "seal"]


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
        last_hash, seq = read_tail(fd)
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
                    read_line(line)
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
