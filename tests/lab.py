"""A test bench with keys we hold: signs fresh requests for any route and body.

The vectors only carry public producer keys; these tests need to sign new requests, so
the lab makes its own producer keys (fixed seeds: deterministic) and configuration.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import uuid
from typing import Any

from multidict import CIMultiDict

from emitter.signing import sign_request
from gateway.config.config import SecurityConfig
from gateway.pipeline import errors as E
from gateway.pipeline.pipeline import Pipeline
from gateway.pipeline.request import Context, SignedRequest
from keyring import Key, Keyring, KeyStatus, PrivateKey
from schemas.routes import GRAPH_PATH, QUERY_PATH, SIGNED_ROUTES, TELEMETRY_PATH
from schemas.signing import request_signing_input
from schemas.validate import Validators

NOW = 1_795_000_000
TENANT = "7758e414-233a-5ea0-575b-cf0c26f5259a"
TENANT_B = "3526adb4-6352-d1d7-fa72-23d93cd439b3"
IDENTITY = "spectrastrike-producer"
PIN = hashlib.sha256(b"lab client certificate").hexdigest()
OTHER_PIN = hashlib.sha256(b"another client certificate").hexdigest()
FP = "4aa626da6a2fcccfa450c83257a15a93b6cd0548da686eff7cae5f520bbdf13c"
ATT = "744ebf90954f39958e7612c4d74de98f4d0b9fb1dbac3711c5bab5ab1c019c4a"
ATT_OTHER = "b0b92d22b1cb93072aa3e76085ebef6cac4013f03524f4b949502ed1018090c8"

PRODUCER = PrivateKey(hashlib.sha256(b"lab producer key").digest())
PRODUCER_B = PrivateKey(hashlib.sha256(b"lab producer key, tenant B").digest())
VALIDATORS = Validators()

TELEMETRY_BODY: dict[str, Any] = {
    "campaign_id": "cmp-001",
    "execution_hash": FP,
    "operator_id": "op-001",
    "tenant_id": TENANT,
    "signed_metadata": {"campaign_id": "cmp-001", "operator_id": "op-001", "tenant_id": TENANT},
    "payload": {
        "event_id": "e8d78c47-0151-c7a7-8b96-916923433315",
        "event_type": "process_execution",
        "source_system": "spectrastrike",
        "severity": "high",
        "observed_at": "2026-11-23T14:52:49.163896+00:00",
        "mitre_techniques": ["T1059.001"],
        "mitre_tactics": ["TA0002"],
        "description": "powershell launched by agent",
        "attributes": {"attestation_measurement_hash": ATT, "schema_version": "1.0",
                       "execution_fingerprint": FP, "host": "ws-17"},
    },
}
GRAPH_BODY: dict[str, Any] = {
    "operator_id": "op-001", "tenant_id": TENANT, "execution_fingerprint": FP,
    "schema_version": "execution.graph.v1", "attestation_measurement_hash": ATT,
    "graph": {"nodes": [{"id": "n0"}, {"id": "n1"}], "edges": [{"from": "n0", "to": "n1"}],
              "target_urn": "urn:target:ws-17"},
}
QUERY_BODY: dict[str, Any] = {"operator_id": "op-001", "tenant_id": TENANT, "limit": 10}
BODIES = {TELEMETRY_PATH: TELEMETRY_BODY, GRAPH_PATH: GRAPH_BODY, QUERY_PATH: QUERY_BODY}

CONFIG: dict[str, Any] = {
    "identities": {IDENTITY: {"pins": [PIN], "tenants": [TENANT]},
                   "spectrastrike-other": {"pins": [OTHER_PIN], "tenants": [TENANT_B]}},
    "operator_tenants": {"op-001": TENANT, "op-002": TENANT_B},
}
KEYS = Keyring([
    Key("lab-2026", PRODUCER.public, identity=IDENTITY, tenants=frozenset({TENANT})),
    Key("lab-b-2026", PRODUCER_B.public, identity=IDENTITY, tenants=frozenset({TENANT_B})),
    Key("lab-revoked", PRODUCER.public, identity=IDENTITY, tenants=frozenset({TENANT}),
        status=KeyStatus.REVOKED),
])


def body_for(path: str, **changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(BODIES[path])
    body.update(changes)
    return body


class Lab:
    """A pipeline over a real store, plus a signer for requests to it."""

    def __init__(self, store, **config: Any) -> None:
        self.store = store
        self.config = SecurityConfig.from_mapping({**CONFIG, **config})
        self.pipeline = Pipeline(self.config, KEYS, VALIDATORS, store)

    def signed(self, path: str = TELEMETRY_PATH, body: dict | None = None, *,
               key: PrivateKey = PRODUCER, kid: str | None = "lab-2026", ts: int = NOW,
               nonce: str | None = None) -> tuple[dict[str, str], bytes]:
        signed = sign_request(key, body if body is not None else body_for(path),
                              identity=IDENTITY, kid=kid, timestamp=ts,
                              nonce=nonce or uuid.uuid4().hex)
        return dict(signed.headers), signed.body

    async def send(self, headers, body: bytes, path: str = TELEMETRY_PATH, *,
                   peer: str | None = PIN, now: int = NOW):
        """→ (status, error code, Context or GatewayError)."""
        request_id = str(uuid.uuid4())
        headers = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers)
        req = SignedRequest(SIGNED_ROUTES[path], headers, body, peer, request_id)
        ctx = Context(request_id)
        try:
            await self.pipeline.process(req, now, ctx)
        except E.GatewayError as exc:
            return exc.status, exc.error, exc
        return 202, None, ctx


def raw_signed(body: bytes, nonce: str = "nonce-raw-0001") -> tuple[dict, bytes]:
    """Headers signing arbitrary bytes (for bodies the canonical serialiser never makes)."""
    sig = PRODUCER.sign(request_signing_input(str(NOW), nonce, body))
    return ({"Content-Type": "application/json", "X-Service-Identity": IDENTITY,
             "X-Telemetry-Timestamp": str(NOW), "X-Telemetry-Nonce": nonce,
             "X-Telemetry-Signature": base64.b64encode(sig).decode(),
             "X-Telemetry-Key-Id": "lab-2026"}, body)
