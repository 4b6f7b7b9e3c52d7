"""Forward the audit file to a SIEM as RFC 5424 syslog over TCP or TLS, at least once.

The durable state is the audit file itself (the hash chain) plus a small state file
naming the last line the receiver *has*: ``{"offset", "sequence", "hash"}``. One round:

1. read the complete lines after ``offset`` under ``flock(LOCK_SH)`` (so only lines whose
   append, fsync included, has finished are seen), each checked against the chain
   (``prev_hash``, own hash, ``event.sequence`` = position): a broken chain stops the
   shipper, it never forwards a forged or edited line;
2. open a connection, send the batch as octet-counted RFC 5424 messages (audit/syslog.py);
3. **confirm**: end the stream (TLS close_notify, then TCP half-close) and wait until the
   receiver closes its side (with or without its own close_notify: rsyslog sends none).
   A syslog receiver closes only after it has read up to the end of the stream, so
   every message was taken off the socket (a receiver that stops with unread data resets
   the connection instead, which counts as a failure); additionally no byte may remain
   unacknowledged in our socket;
4. only then replace the state file (write, fsync, rename, fsync the directory).

Any failure (refused, reset, timeout, certificate) → back off (doubling, bounded) and
resend from the recorded position: duplicates are possible, gaps are not. Each message
carries ``event.sequence`` (in the JSON and as ``seq`` in the structured data): the
consumer drops repeats by it. Plain TCP offers no acknowledgement; a flushed ``send`` is
only in our kernel, which is why step 3 exists (see docs/RESILIENCE.md).

One shipper per state file: it holds ``flock(LOCK_EX | LOCK_NB)`` on ``STATE.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import ssl
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.seal import GENESIS, SEQUENCE, is_hex64, read_line
from audit.syslog import frame, rfc5424
from audit.tail import last_line
from audit.verify import check_line
from common.files import replace_durably

__all__ = ["ShipError", "ShipState", "Shipper", "ShipperBusy"]

_CHUNK = 4 << 20  # bytes read per round at most (a line is at most 1 MiB)


class ShipError(RuntimeError):
    """The shipper cannot continue safely (broken chain, replaced file, bad state)."""


class ShipperBusy(ShipError):
    """Another shipper holds the lock of this state file."""


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
            data = os.pread(self.fd, min(size - state.offset, _CHUNK), state.offset)
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


class Shipper:
    """``run(stop)`` ships until ``stop`` is set; ``ship_once()`` one round."""

    def __init__(self, audit_path: Path | str, cfg: Any, *, log=None) -> None:
        self.path, self.cfg = Path(audit_path), cfg
        self.log = log or (lambda msg: None)
        self.state_path = Path(cfg.state_path)
        self.shipped_total = 0  # events delivered by this process (resends included)
        self.lag_events = 0  # events in the file not yet delivered
        self.failures = 0
        self._lock_fd = self._take_lock()
        self.state = ShipState.load(self.state_path)
        self.reader: ChainReader | None = None

    def _take_lock(self) -> int:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.state_path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShipperBusy(f"another shipper holds {self.state_path}.lock") from None
        return fd

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _reader(self) -> ChainReader | None:
        if self.reader is None:
            if not self.path.exists():
                return None  # nothing audited yet
            self.reader = ChainReader(self.path)
            self.reader.check_position(self.state)
        return self.reader

    def _follow_rotation(self) -> bool:
        """The old file is shipped to its end and the path now names a file whose first
        line continues the chain right after it (`fedgate audit rotate`): go on there."""
        try:
            new = ChainReader(self.path)
        except FileNotFoundError:
            return False
        anchor = rotated_anchor(os.pread(new.fd, _CHUNK, 0))
        if anchor != (self.state.hash, self.state.sequence):
            new.close()
            return False
        if self.reader is not None:
            self.reader.close()
        self.reader = new
        self.state = ShipState(0, self.state.sequence, self.state.hash)
        self.state.save(self.state_path)
        self.log(f"fedgate: audit ship: {self.path} was rotated; continuing at sequence "
                 f"{self.state.sequence + 1}")
        return True

    def ship_once(self) -> int:
        """Deliver what the file holds now (one batch); the number of events delivered.
        OSError / ssl.SSLError / TimeoutError when the receiver did not confirm."""
        reader = self._reader()
        if reader is None:
            return 0
        entries, tail = reader.read(self.state, self.cfg.batch_max_events)
        self.lag_events = tail - self.state.sequence
        if not entries:
            if reader.replaced() and self._follow_rotation():
                return 0
            if reader.replaced():
                raise ShipError(f"{self.path} was replaced (rotated?): the ship state refers "
                                "to the old file; see docs/AUDIT.md")
            return 0
        payload = b"".join(frame(rfc5424(e.event, e.line, hostname=self.cfg.hostname,
                                         facility=self.cfg.facility,
                                         sequence=e.state.sequence)) for e in entries)
        self._deliver(payload)
        self.state = entries[-1].state
        self.state.save(self.state_path)
        self.shipped_total += len(entries)
        self.lag_events = max(0, tail - self.state.sequence)
        return len(entries)

    def _connect(self) -> socket.socket:
        cfg = self.cfg
        sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout_s)
        if cfg.transport != "tls":
            return sock
        ctx = ssl.create_default_context(cafile=str(cfg.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 5425 §4.2 allows nothing older
        if cfg.client_cert is not None:
            ctx.load_cert_chain(str(cfg.client_cert), str(cfg.client_key))
        try:
            return ctx.wrap_socket(sock, server_hostname=cfg.server_name)
        except BaseException:
            sock.close()
            raise

    def _deliver(self, payload: bytes) -> None:
        sock = self._connect()
        try:
            sock.settimeout(self.cfg.ack_timeout_s)
            sock.sendall(payload)
            if isinstance(sock, ssl.SSLSocket):
                # our close_notify: the receiver reads up to it, then closes (rsyslog's gtls
                # without a close_notify of its own: that EOF is the expected answer)
                with contextlib.suppress(ssl.SSLEOFError):
                    sock.unwrap()
            _await_close(sock)
        finally:
            sock.close()

    def run(self, stop: threading.Event, *, once: bool = False, progress=None) -> None:
        """Ship until ``stop`` is set (``once``: until caught up, then return)."""
        backoff = self.cfg.backoff_initial_s
        while not stop.is_set():
            try:
                sent = self.ship_once()
            except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
                self.failures += 1
                self.log(f"delivery failed ({exc.__class__.__name__}: {exc}); resending from "
                         f"sequence {self.state.sequence + 1} in {backoff:g} s")
                stop.wait(backoff)
                backoff = min(self.cfg.backoff_max_s, backoff * 2)
                continue
            backoff = self.cfg.backoff_initial_s
            if progress is not None:
                progress(self)
            if not sent:
                if once and self.lag_events == 0:
                    return
                stop.wait(self.cfg.poll_interval_s)

    def metrics_text(self) -> str:
        return ("# HELP fedgate_audit_shipped_total Audit events delivered to the SIEM by "
                "this shipper process (resends included).\n"
                "# TYPE fedgate_audit_shipped_total counter\n"
                f"fedgate_audit_shipped_total {self.shipped_total}\n"
                "# HELP fedgate_audit_shipper_lag_events Audit events written but not yet "
                "delivered.\n# TYPE fedgate_audit_shipper_lag_events gauge\n"
                f"fedgate_audit_shipper_lag_events {self.lag_events}\n")

    def write_metrics(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.metrics_text(), encoding="utf-8")
        os.replace(tmp, path)  # a scraper never reads half a file


def _await_close(sock: socket.socket) -> None:
    """Half-close, then read until the receiver closes; it must have acknowledged every
    byte (a reset, a timeout or data left unacknowledged raises)."""
    sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + (sock.gettimeout() or 10.0)
    while sock.recv(4096):
        if time.monotonic() > deadline:
            raise TimeoutError("the receiver keeps sending instead of closing")
    pending = int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4),
                             "little", signed=True)
    if pending:
        raise ConnectionError(f"the receiver closed with {pending} bytes unacknowledged")
