"""The two signing inputs of the wire protocol, shared by gateway and emitter.

- §3 request: ``ASCII(timestamp) "." ASCII(nonce) "." raw body bytes``.
- §6 feedback: ``tenant_id|signed_at|nonce|schema_version|kid|canonical(data)`` (UTF-8).
"""

from __future__ import annotations

from typing import Any

from .canonical import dumps

FEEDBACK_SCHEMA_VERSION = "feedback.response.v1"
SIGNATURE_ALGORITHM = "Ed25519"


def request_signing_input(timestamp: str, nonce: str, body: bytes) -> bytes:
    """Exactly the bytes the producer signed; ``timestamp``/``nonce`` as sent (ASCII)."""
    return b"%s.%s.%s" % (timestamp.encode("ascii"), nonce.encode("ascii"), body)


def feedback_signing_input(
    tenant_id: str, signed_at: int, nonce: str, schema_version: str, kid: str, data: Any
) -> bytes:
    head = f"{tenant_id}|{signed_at}|{nonce}|{schema_version}|{kid}|".encode()
    return head + dumps(data)
