"""The feedback answer (PROTOCOL.md §5-§6): adjustments, signed by ``feedback_kid``.

The response nonce is ``<query nonce>.<16+ url-safe random chars>``, binding the answer
to its question; the signature covers §6's input over the tenant the query named.
Adjustments come from the policy engine (issue 4); until one is configured the gateway
answers with an empty, still signed and bound, ``data`` array — it never invents an
adjustment, and never one without the anchored attestation hash.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from keyring import PrivateKey
from schemas.signing import (
    FEEDBACK_SCHEMA_VERSION,
    SIGNATURE_ALGORITHM,
    feedback_signing_input,
)

from .store import Store

Policy = Callable[[Store, str, int, int], Awaitable[list[dict[str, Any]]]]


async def no_adjustments(store: Store, tenant_id: str, limit: int, now: int) -> list[dict]:
    return []


def bound_nonce(query_nonce: str) -> str:
    return f"{query_nonce}.{secrets.token_urlsafe(12)}"  # 16 url-safe characters


def sign_feedback(key: PrivateKey, kid: str, *, tenant_id: str, data: list[dict[str, Any]],
                  signed_at: int, nonce: str, request_id: str) -> dict[str, Any]:
    message = feedback_signing_input(tenant_id, signed_at, nonce, FEEDBACK_SCHEMA_VERSION,
                                     kid, data)
    return {
        "request_id": request_id, "status": "accepted", "data": data, "errors": [],
        "signature": base64.b64encode(key.sign(message)).decode("ascii"),
        "kid": kid, "signature_algorithm": SIGNATURE_ALGORITHM, "signed_at": signed_at,
        "nonce": nonce, "schema_version": FEEDBACK_SCHEMA_VERSION,
    }


class FeedbackIssuer:
    def __init__(self, store: Store, key: PrivateKey, kid: str,
                 policy: Policy = no_adjustments) -> None:
        self.store, self.key, self.kid, self.policy = store, key, kid, policy

    async def issue(self, ctx: Any, now: int) -> dict[str, Any]:
        limit = ctx.body.get("limit", 100)
        data = await self.policy(self.store, ctx.tenant_id, limit, now)
        return sign_feedback(self.key, self.kid, tenant_id=ctx.tenant_id, data=data[:limit],
                             signed_at=now, nonce=bound_nonce(ctx.body["nonce"]),
                             request_id=ctx.request_id)
