"""Build a signed request exactly as PROTOCOL.md §3 says (headers + canonical body).

Pure: the caller supplies the key, the clock reading and the nonce, so the same inputs
always give the same bytes (Ed25519 is deterministic) — which is what a retry needs.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any

from keyring.ed25519 import PrivateKey
from schemas.canonical import dumps
from schemas.signing import request_signing_input


@dataclass(frozen=True, slots=True)
class SignedBody:
    headers: dict[str, str]
    body: bytes


def new_nonce() -> str:
    """24 url-safe characters (18 random bytes), inside ^[A-Za-z0-9_-]{8,128}$."""
    return secrets.token_urlsafe(18)


def sign_request(
    key: PrivateKey, body: dict[str, Any], *, identity: str, kid: str | None,
    timestamp: int, nonce: str,
) -> SignedBody:
    """Sign ``body`` (its ``timestamp``/``nonce`` members are set to the headers')."""
    body = {**body, "timestamp": timestamp, "nonce": nonce}
    raw = dumps(body)
    signature = key.sign(request_signing_input(str(timestamp), nonce, raw))
    headers = {
        "Content-Type": "application/json",
        "X-Service-Identity": identity,
        "X-Telemetry-Timestamp": str(timestamp),
        "X-Telemetry-Nonce": nonce,
        "X-Telemetry-Signature": base64.b64encode(signature).decode("ascii"),
    }
    if kid is not None:
        headers["X-Telemetry-Key-Id"] = kid
    return SignedBody(headers, raw)
