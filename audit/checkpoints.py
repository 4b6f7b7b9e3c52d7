"""Signed checkpoints of the audit chain's head (issue 10, docs/AUDIT.md *Checkpoints*).

A checkpoint is ``{"sequence", "hash", "signed_at", "kid", "signature"}``: the
``event.sequence`` and ``hash`` of the line it covers, the Unix second it was signed,
the audit key's kid and the Ed25519 signature (base64url, no padding) over

    canonical({"hash": H, "kid": K, "sequence": S, "signed_at": T,
               "type": "fedgate.audit.checkpoint.v1"})

(``schemas.canonical.dumps``: sorted keys, no spaces). It is written twice, both under
the appenders' flock:

1. as the next line of the log, ``event.action = "audit.checkpoint"``, chained like any
   event (sequence S + 1, ``prev_hash`` = H), the record in ``checkpoint.*`` members;
2. then to the sidecar ``<audit file>.checkpoint`` (the record as JSON, replaced
   atomically), which survives a cut tail: the log must reach line S + 1 and hold this
   very checkpoint there.

Triggers: after an event whose ``event.sequence`` is a multiple of ``every_events``
(the appender that writes it holds the lock, so exactly one process sees it; in a batch
the checkpoint line goes right after that event, in the same write), and
:meth:`Checkpointer.tick` (a timer in every gateway worker): under the lock, when the
last line is not already a checkpoint and the sidecar is ``every_s`` old or missing.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from audit.chain import AuditError, AuditLog
from audit.ecs import service_event
from audit.events import rfc3339_ms
from audit.seal import SEQUENCE
from audit.tail import head
from common.files import replace_durably
from keyring.ed25519 import PrivateKey, verify
from schemas.canonical import dumps

__all__ = ["CHECKPOINT", "ROTATED", "Checkpoint", "Checkpointer", "checkpoint_event",
           "read_sidecar", "sidecar_path", "signing_input"]

CHECKPOINT = "audit.checkpoint"
ROTATED = "audit.rotated"  # first line of a rotated-to file (audit/rotate.py)
TYPE = "fedgate.audit.checkpoint.v1"
_FIELDS = ("sequence", "hash", "signed_at", "kid", "signature")


def sidecar_path(audit_path: Path | str) -> Path:
    return Path(f"{audit_path}.checkpoint")


def signing_input(sequence: int, hash_: str, signed_at: int, kid: str) -> bytes:
    return dumps({"hash": hash_, "kid": kid, "sequence": sequence, "signed_at": signed_at,
                  "type": TYPE})


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return b""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    sequence: int
    hash: str
    signed_at: int
    kid: str
    signature: str

    @classmethod
    def sign(cls, key: PrivateKey, kid: str, sequence: int, hash_: str,
             signed_at: int) -> Checkpoint:
        sig = key.sign(signing_input(sequence, hash_, signed_at, kid))
        return cls(sequence, hash_, signed_at, kid, _b64(sig))

    @classmethod
    def from_mapping(cls, raw: Any, prefix: str = "") -> Checkpoint:
        """From the sidecar (``prefix=""``) or a log line (``"checkpoint."``); ValueError."""
        if not isinstance(raw, dict):
            raise ValueError("checkpoint is not a JSON object")
        vals = [raw.get(prefix + name) for name in _FIELDS]
        seq, hash_, signed_at, kid, sig = vals
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (seq, signed_at))
        if not (ints and all(isinstance(v, str) for v in (hash_, kid, sig))):
            raise ValueError("malformed checkpoint (sequence, hash, signed_at, kid, signature)")
        return cls(seq, hash_, signed_at, kid, sig)

    def members(self, prefix: str = "") -> dict[str, Any]:
        return {prefix + k: v for k, v in asdict(self).items()}

    def verifies(self, public: bytes) -> bool:
        return verify(public, _unb64(self.signature),
                      signing_input(self.sequence, self.hash, self.signed_at, self.kid))

    def describe(self) -> str:
        when = rfc3339_ms(self.signed_at).replace(".000Z", "Z")
        return f"checkpoint at sequence {self.sequence} (signed_at {when}, kid {self.kid})"


def checkpoint_event(cp: Checkpoint, action: str = CHECKPOINT, **extra: Any) -> dict[str, Any]:
    """The log line carrying ``cp`` (chain members are added by the appender)."""
    return {**service_event(rfc3339_ms(cp.signed_at), action), **extra,
            **cp.members("checkpoint.")}


def read_sidecar(path: Path | str) -> Checkpoint | None:
    """The sidecar's checkpoint; None when there is none; ValueError when unreadable."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return Checkpoint.from_mapping(json.loads(data))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_sidecar(path: Path, cp: Checkpoint) -> None:
    """Replace ``path`` atomically (temporary file, fsync, rename, fsync of the dir)."""
    replace_durably(path, dumps(cp.members()) + b"\n")


class Checkpointer:
    """Signs the head of one audit file; give it to ``AuditLog(checkpoints=…)``."""

    def __init__(self, key: PrivateKey, kid: str, *, every_events: int = 1000,
                 every_s: float = 60.0, clock: Any = time.time) -> None:
        if every_events < 1 or every_s <= 0:
            raise ValueError("every_events must be >= 1 and every_s > 0")
        self.key, self.kid = key, kid
        self.every_events, self.every_s, self.clock = every_events, every_s, clock

    def line_after(self, body: dict[str, Any]) -> tuple[Checkpoint, dict[str, Any]] | None:
        """Called by ``AuditLog.append_many`` (lock held) for each event it chains: when
        ``body``'s sequence is a multiple of ``every_events``, the checkpoint of it and
        its log line, which the appender chains right after ``body`` in the same write
        (then calls :meth:`sidecar`, after the fsync)."""
        if body.get("event.action") in (CHECKPOINT, ROTATED) or \
                body[SEQUENCE] % self.every_events:
            return None
        cp = Checkpoint.sign(self.key, self.kid, body[SEQUENCE], body["hash"],
                             int(self.clock()))
        return cp, checkpoint_event(cp)

    def sidecar(self, log: AuditLog, cp: Checkpoint) -> None:
        """Replace the sidecar with ``cp`` (its line is written and fsynced; lock held)."""
        try:
            write_sidecar(sidecar_path(log.path), cp)
        except OSError as exc:
            raise AuditError(f"cannot write the checkpoint sidecar: {exc.strerror}") from None

    def tick(self, log: AuditLog) -> Checkpoint | None:
        """The time trigger: checkpoint the head if it is unsigned and the last
        checkpoint (sidecar) is ``every_s`` old; whichever process comes first does."""
        with log.locked() as fd:
            last_hash, seq, action = head(fd)
            if seq == 0 or action in (CHECKPOINT, ROTATED):
                return None
            try:
                side = read_sidecar(sidecar_path(log.path))
            except ValueError:
                side = None  # rewritten below
            if side is not None and self.clock() - side.signed_at < self.every_s:
                return None
            return self.write_locked(log, fd, seq, last_hash)

    def checkpoint(self, log: AuditLog) -> Checkpoint | None:
        """Sign the head now, unless it is already a checkpoint line (or empty)."""
        with log.locked() as fd:
            last_hash, seq, action = head(fd)
            if seq == 0 or action == CHECKPOINT:
                return None
            return self.write_locked(log, fd, seq, last_hash)

    def write_locked(self, log: AuditLog, fd: int, sequence: int, hash_: str,
                     **extra: Any) -> Checkpoint:
        cp = Checkpoint.sign(self.key, self.kid, sequence, hash_, int(self.clock()))
        log.append_locked(fd, checkpoint_event(cp, **extra))
        self.sidecar(log, cp)
        return cp
