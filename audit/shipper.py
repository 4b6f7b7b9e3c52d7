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
The state file and the checked reading of step 1 are audit/ship_position.py's; this
module is the loop, the delivery and its confirmation.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import ssl
import termios
import threading
import time
from pathlib import Path
from typing import Any

from audit.ship_position import CHUNK, ChainReader, ShipError, ShipState, rotated_anchor
from audit.syslog import frame, rfc5424

# ShipError and ShipState live in ship_position.py; the tests import them from here too
__all__ = ["ShipError", "ShipState", "Shipper", "ShipperBusy"]


class ShipperBusy(ShipError):
    """Another shipper holds the lock of this state file."""


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
        anchor = rotated_anchor(os.pread(new.fd, CHUNK, 0))
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
