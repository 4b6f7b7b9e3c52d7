"""One line of the hash-chained audit file (PROTOCOL.md §7): its hash, and reading it back.

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

Lines are read back with :func:`schemas.canonical.load_stored`, the gateway's own
strict parser (PROTOCOL.md §3: one parser for every later reader). The appender
(audit/chain.py), the verifier (audit/verify.py) and the shipper all read lines here.
"""

from __future__ import annotations

import hashlib
from typing import Any

from schemas.canonical import (
    INVALID_UTF8,
    MALFORMED,
    NOT_OBJECT,
    CanonicalError,
    dumps,
    load_stored,
)

GENESIS = "0" * 64
SEQUENCE = "event.sequence"  # 1-based position of the line in its file
HASH_ECS, PREV_ECS = "event.hash", "fedgate.prev_hash"  # [v1.1] ECS names of hash/prev_hash
_CHAIN = ("prev_hash", "hash", SEQUENCE, HASH_ECS, PREV_ECS)
_HEX = frozenset("0123456789abcdef")


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


def aliases_agree(event: dict[str, Any]) -> str | None:
    """Why the ECS names of the chain members disagree with theirs, or None."""
    if event.get(HASH_ECS, event["hash"]) != event["hash"]:
        return f"{HASH_ECS} differs from hash: the line was edited"
    if event.get(PREV_ECS, event.get("prev_hash")) != event.get("prev_hash"):
        return f"{PREV_ECS} differs from prev_hash"
    return None


def is_hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def read_line(line: bytes) -> dict[str, Any]:
    """One audit line (newline stripped) with the one strict reader; ValueError(reason)."""
    try:
        return load_stored(line)
    except CanonicalError as exc:
        if exc.code == NOT_OBJECT:
            raise ValueError("not a JSON object") from None
        if exc.code in (MALFORMED, INVALID_UTF8):
            raise ValueError("not JSON") from None
        raise ValueError(f"not strict canonical JSON ({exc.code})") from None
