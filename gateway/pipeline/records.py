"""What an accepted request becomes: the stored record, the anchor, the 202 answer.

Pure functions of the verified request (PROTOCOL.md §5). A finding record keeps the
exact signed bytes and the evidence needed to re-verify it offline later.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from common.ids import uuid4_text
from gateway.config.config import SecurityConfig
from gateway.feedback.fold import body_fold
from gateway.store import Anchor, Commit, Record
from schemas.canonical import dumps
from schemas.routes import FINDING_SCHEMA_VERSION, Route

from .request import Context, SignedRequest


def execution_binding(route: Route, body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(execution_fingerprint, attestation_measurement_hash)`` named by the body.

    Lower-cased: hex is case-insensitive, and an anchor must not be dodged by sending
    the same fingerprint in upper case.
    """
    if route.kind == "telemetry":
        fp, att = body["execution_hash"], body["payload"]["attributes"][
            "attestation_measurement_hash"]
    elif route.kind == "graph":
        fp, att = body["execution_fingerprint"], body["attestation_measurement_hash"]
    else:
        return None, None
    return fp.lower(), att.lower()


def build_commit(
    req: SignedRequest, body: Mapping[str, Any], ctx: Context, now: int,
    cfg: SecurityConfig, signature: bytes,
) -> Commit:
    """The single atomic write of §4 steps 12-14 for an accepted request."""
    digest = hashlib.sha256(req.body).hexdigest()
    record_id = uuid4_text()
    evidence = {
        "request_id": ctx.request_id,
        "received_at": now,
        "identity": ctx.identity,
        "peer_cert_sha256": req.peer_cert_sha256,
        "kid": ctx.kid,
        "signature": base64.b64encode(signature).decode("ascii"),
        "timestamp": body["timestamp"],
        "nonce": body["nonce"],
        "tenant_id": ctx.tenant_id,
        "operator_id": ctx.operator_id,
        "body_sha256": digest,
        "body_b64": base64.b64encode(req.body).decode("ascii"),
    }
    if req.route.kind == "telemetry":
        evidence.update(
            finding_id=record_id, campaign_id=body["campaign_id"],
            execution_fingerprint=ctx.execution_fingerprint,
            attestation_measurement_hash=ctx.attestation_hash,
            schema_version=FINDING_SCHEMA_VERSION,
        )
    elif req.route.kind == "graph":
        evidence.update(
            graph_id=record_id, execution_fingerprint=ctx.execution_fingerprint,
            attestation_measurement_hash=ctx.attestation_hash,
        )
    else:  # the issued feedback, with the query that asked for it
        evidence.update(feedback_id=record_id, limit=body.get("limit", 100),
                        response=ctx.response)
    anchor = None
    if req.route.anchors and cfg.anchor_attestation and ctx.execution_fingerprint:
        anchor = Anchor(ctx.tenant_id, ctx.execution_fingerprint, ctx.attestation_hash)
    record = Record(req.route.record_kind, record_id, ctx.tenant_id,
                    ctx.execution_fingerprint, dumps(evidence))
    fold = None  # a finding's or graph's facts, from the body in hand (not record.data)
    if ctx.execution_fingerprint is not None:
        fold = body_fold(record.kind, body, identity=ctx.identity, tenant_id=ctx.tenant_id,
                         execution_fingerprint=ctx.execution_fingerprint,
                         attestation_hash=ctx.attestation_hash, received_at=now)
    audit = owner = None
    if ctx.outbox is not None:  # the accept's audit events, stored with the record
        ctx.outbox.events = ctx.outbox.build(ctx)
        audit, owner = orjson.dumps(ctx.outbox.events), ctx.outbox.owner
    return Commit(
        identity=ctx.identity, nonce=body["nonce"], body_digest=digest,
        request_id=ctx.request_id, now=now, nonce_ttl_s=cfg.nonce_ttl_s,
        record=record, anchor=anchor, valid_from=body["timestamp"] - cfg.clock_skew_s,
        audit=audit, audit_owner=owner, fold=fold,
    )


def accepted_body(route: Route, ctx: Context) -> dict[str, Any]:
    """The 202 answer of §5 for telemetry and graphs (feedback answers are built apart)."""
    if route.kind == "telemetry":
        return {
            "accepted": True,
            "request_id": ctx.request_id,
            "finding_id": ctx.record_id,
            "execution_fingerprint": ctx.execution_fingerprint,
            "attestation_measurement_hash": ctx.attestation_hash,
        }
    return {"request_id": ctx.request_id, "status": "accepted",
            "data": {"graph_synced": True}, "errors": []}
