"""``fedgate audit verify FILE… [--checkpoint-key K] [--checkpoint SIDE]``: the chain
across rotated files, every checkpoint in it, the sidecar, and how far it is signed.

One streaming pass over the files in order. A file after the first must continue the
chain of the one before (``prev_hash`` = its last hash, ``event.sequence`` = its last
sequence + 1), else a file is missing between them. The first file may itself start
mid-chain when its first line is ``audit.rotated`` (a rotated-to file): the report says
where. (Any other first line must follow the genesis hash, as before.) Each
``audit.checkpoint`` line must sign the line just before it; an ``audit.rotated``
line's copy must equal the last checkpoint seen. The sidecar's checkpoint must be in the
log (its line, S + 1, present and carrying the very same record): a log ending before it
had its tail cut.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from audit.checkpoints import CHECKPOINT, ROTATED, Checkpoint, read_sidecar
from audit.seal import GENESIS, SEQUENCE, read_line
from audit.verify import check_line
from keyring.ed25519 import PrivateKey
from keyring.keys import Keyring, KeyringError, parse_jwks

__all__ = ["CheckpointKeys", "Coverage", "VerifyFailed", "load_checkpoint_keys",
           "verify_files"]


class VerifyFailed(Exception):
    """The one line saying why: broken chain, missing file, cut tail, bad checkpoint."""


class CheckpointKeys:
    """The audit public key(s): a JWKS (by kid, status and window honoured) or one key."""

    def __init__(self, source: str, keyring: Keyring | None = None,
                 public: bytes | None = None) -> None:
        self.source, self.keyring, self.public = source, keyring, public

    def problem(self, cp: Checkpoint) -> str | None:
        if self.keyring is None:
            ok = self.public is not None and cp.verifies(self.public)
            return None if ok else f"signature does not verify with {self.source}"
        if cp.kid not in self.keyring:
            return f"kid {cp.kid!r} is not in {self.source}"
        key = self.keyring[cp.kid]
        if not key.valid_at(cp.signed_at):
            return f"kid {cp.kid!r} is {key.status.value} or outside its validity at signed_at"
        return None if cp.verifies(key.public) else f"signature does not verify (kid {cp.kid})"


def load_checkpoint_keys(path: Path) -> CheckpointKeys:
    """A JWKS file, a PEM public key, or the PEM private key itself; ValueError."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"{"):
        try:
            return CheckpointKeys(str(path), keyring=parse_jwks(json.loads(data)))
        except (KeyringError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
    if b"PRIVATE KEY" in data:
        return CheckpointKeys(str(path), public=PrivateKey.from_pem(data).public)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{path}: neither a JWKS nor a PEM Ed25519 key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return CheckpointKeys(str(path), public=key.public_bytes_raw())


@dataclass
class Coverage:
    lines: int = 0
    first: int = 1  # sequence of the first line
    last: int = 0  # sequence of the last line
    last_hash: str = GENESIS
    starts_after: str | None = None  # when the first file continues an earlier one
    checkpoint: Checkpoint | None = None  # the latest one (log or sidecar)
    checkpoint_line: int = 0  # the sequence of the line carrying it
    signed_checked: bool = False
    seen: dict[int, Checkpoint] = field(default_factory=dict)

    def __str__(self) -> str:
        out = f"intact: {self.lines} lines, last hash {self.last_hash}"
        if self.starts_after:
            out += f" ({self.starts_after})"
        if self.checkpoint is not None:
            unsigned = self.last - self.checkpoint_line
            out += (f", covered by {self.checkpoint.describe()}; {unsigned} events after it "
                    "unsigned")
            if not self.signed_checked:
                out += " (signatures not checked: no --checkpoint-key)"
        elif self.signed_checked:
            out += ", not covered by any checkpoint"
        return out


def verify_files(paths: Sequence[Path], keys: CheckpointKeys | None = None,
                 sidecar: Path | None = None) -> Coverage:
    """The coverage of ``paths`` (in order); VerifyFailed (one line); OSError unreadable."""
    cov = Coverage(signed_checked=keys is not None)
    prev, seq = GENESIS, 0
    for index, path in enumerate(paths):
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                event = _event(raw)
                if number == 1 and event is not None and isinstance(event.get(SEQUENCE), int):
                    start, after = event[SEQUENCE] - 1, event.get("prev_hash")
                    if index == 0 and event.get("event.action") == ROTATED and \
                            isinstance(after, str):
                        prev, seq, cov.first = after, start, start + 1
                        cov.starts_after = f"chain starts at sequence {start + 1}, after hash " \
                                           f"{after}{_from(event)}"
                    elif index > 0 and (after, start) != (prev, seq):
                        raise VerifyFailed(
                            f"{path} does not continue {paths[index - 1]}: it starts after "
                            f"sequence {start}, which ends at sequence {seq}: a file between "
                            "them is missing, or the files are out of order")
                try:
                    new = check_line(raw, prev, seq + 1)
                except ValueError as exc:
                    raise VerifyFailed(f"{path}: broken: line {number}: {exc}") from None
                action = event.get("event.action") if event else None
                if action in (CHECKPOINT, ROTATED):
                    _checkpoint(cov, keys, event, action, seq, prev, f"{path}: line {number}")
                prev, seq, cov.lines = new, seq + 1, cov.lines + 1
    cov.last, cov.last_hash = seq, prev
    if sidecar is not None:
        _sidecar(cov, keys, sidecar)
    return cov


def _event(raw: bytes) -> dict | None:
    try:
        return read_line(raw.rstrip(b"\n"))
    except ValueError:
        return None  # check_line names the defect


def _from(event: dict) -> str:
    source = event.get("audit.rotated_from")
    return f", rotated from {source}" if isinstance(source, str) else ""


def _checkpoint(cov: Coverage, keys: CheckpointKeys | None, event: dict, action: str,
                seq: int, prev: str, where: str) -> None:
    try:
        cp = Checkpoint.from_mapping(event, "checkpoint.")
    except ValueError as exc:
        raise VerifyFailed(f"{where}: {exc}") from None
    if keys is not None and (problem := keys.problem(cp)):
        raise VerifyFailed(f"{where}: {cp.describe()}: {problem}")
    if action == CHECKPOINT and (cp.sequence, cp.hash) != (seq, prev):
        raise VerifyFailed(f"{where}: {cp.describe()} does not match the chain (it signs "
                           f"sequence {cp.sequence} hash {cp.hash}; the line before is "
                           f"sequence {seq} hash {prev})")
    if action == ROTATED and cov.checkpoint is not None and cp != cov.checkpoint:
        raise VerifyFailed(f"{where}: the rotation's checkpoint is not the old file's last "
                           f"({cov.checkpoint.describe()})")
    cov.seen[seq + 1] = cp
    cov.checkpoint, cov.checkpoint_line = cp, seq + 1


def _sidecar(cov: Coverage, keys: CheckpointKeys | None, path: Path) -> None:
    try:
        side = read_sidecar(path)
    except ValueError as exc:
        raise VerifyFailed(str(exc)) from None
    if side is None:
        raise VerifyFailed(f"{path}: no such checkpoint file")
    if keys is not None and (problem := keys.problem(side)):
        raise VerifyFailed(f"{path}: {side.describe()}: {problem}")
    line = side.sequence + 1
    if line > cov.last:
        raise VerifyFailed(f"the log ends at sequence {cov.last}, but {path} holds the "
                           f"{side.describe()}, written as sequence {line}: the tail was cut "
                           f"(at least sequences {cov.last + 1}-{line} are missing)")
    found = cov.seen.get(line) or next(
        (cp for cp in cov.seen.values() if cp.sequence == side.sequence), None)
    if found != side and line >= cov.first:
        raise VerifyFailed(f"{path}: its {side.describe()} is not in the log (sequence {line} "
                           "is not that checkpoint)")
