"""Every §4 code the vectors do not already reach, on both real stores.

Each row builds one request with the lab's keys and names the exact status and error
code it must get; every rejection must leave the nonce unclaimed and no record behind.
"""

from __future__ import annotations

import base64
import json
import sqlite3

import pytest
from lab import (
    ATT_OTHER,
    IDENTITY,
    NOW,
    OTHER_PIN,
    PIN,
    PRODUCER,
    PRODUCER_B,
    TENANT,
    TENANT_B,
    Lab,
    body_for,
)
from multidict import CIMultiDict

from gateway.store import open_store
from keyring.ed25519 import PrivateKey
from schemas.routes import GRAPH_PATH, QUERY_PATH, TELEMETRY_PATH
from schemas.signing import request_signing_input


def with_header(headers: dict, name: str, value: str | None) -> dict:
    out = {k: v for k, v in headers.items() if k.lower() != name.lower()}
    if value is not None:
        out[name] = value
    return out


def resign(lab: Lab, body: bytes, ts: int = NOW, nonce: str = "nonce-raw-0001",
           key: PrivateKey = PRODUCER) -> dict:
    """Headers for arbitrary raw bytes (not produced by the canonical serialiser)."""
    sig = key.sign(request_signing_input(str(ts), nonce, body))
    return {"Content-Type": "application/json", "X-Service-Identity": IDENTITY,
            "X-Telemetry-Timestamp": str(ts), "X-Telemetry-Nonce": nonce,
            "X-Telemetry-Signature": base64.b64encode(sig).decode(),
            "X-Telemetry-Key-Id": "lab-2026"}


def dup(headers: dict, name: str) -> CIMultiDict:
    md = CIMultiDict(headers)
    md.add(name, headers[name])
    return md


# name → (build(lab) → (headers, body, path, peer), config overrides, status, code)
def _ok(lab, path=TELEMETRY_PATH, **kw):
    headers, body = lab.signed(path, **kw)
    return headers, body, path, None


ROWS = {
    "content_type_text_plain": (
        lambda lab: (with_header(lab.signed()[0], "Content-Type", "text/plain"),
                     lab.signed()[1], TELEMETRY_PATH, None), {}, 415, "unsupported_media_type"),
    "content_type_missing": (
        lambda lab: (with_header(lab.signed()[0], "Content-Type", None), lab.signed()[1],
                     TELEMETRY_PATH, None), {}, 415, "unsupported_media_type"),
    "content_type_latin1_charset": (
        lambda lab: (with_header(lab.signed()[0], "Content-Type",
                                 "application/json; charset=latin-1"), lab.signed()[1],
                     TELEMETRY_PATH, None), {}, 415, "unsupported_media_type"),
    "body_too_large": (lambda lab: _ok(lab), {"max_body_bytes": 256}, 413, "body_too_large"),
    "empty_body": (lambda lab: (lab.signed()[0], b"", TELEMETRY_PATH, None), {}, 422,
                   "empty_body"),
    "identity_header_repeated": (
        lambda lab: (dup(lab.signed()[0], "X-Service-Identity"), lab.signed()[1],
                     TELEMETRY_PATH, None), {}, 401, "identity_rejected"),
    "no_client_certificate": (
        lambda lab: (*lab.signed(), TELEMETRY_PATH, "none"), {}, 401, "identity_rejected"),
    "cert_of_other_identity": (
        lambda lab: (*lab.signed(), TELEMETRY_PATH, OTHER_PIN), {}, 401, "identity_rejected"),
    "timestamp_leading_zero": (
        lambda lab: (with_header(lab.signed()[0], "X-Telemetry-Timestamp", "0" + str(NOW)),
                     lab.signed()[1], TELEMETRY_PATH, None), {}, 401,
        "malformed_signature_headers"),
    "timestamp_signed_plus": (
        lambda lab: (with_header(lab.signed()[0], "X-Telemetry-Timestamp", "+" + str(NOW)),
                     lab.signed()[1], TELEMETRY_PATH, None), {}, 401,
        "malformed_signature_headers"),
    "nonce_too_short": (lambda lab: _ok(lab, nonce="short"), {}, 401,
                        "malformed_signature_headers"),
    "kid_malformed": (lambda lab: _ok(lab, kid="bad kid!"), {}, 401,
                      "malformed_signature_headers"),
    "signature_urlsafe_alphabet": (
        lambda lab: (with_header(lab.signed()[0], "X-Telemetry-Signature", "-_" * 43 + "=="),
                     lab.signed()[1], TELEMETRY_PATH, None), {}, 401,
        "malformed_signature_headers"),
    "nonce_header_repeated": (
        lambda lab: (dup(lab.signed()[0], "X-Telemetry-Nonce"), lab.signed()[1],
                     TELEMETRY_PATH, None), {}, 401, "malformed_signature_headers"),
    "unknown_kid_explicit": (
        lambda lab: _ok(lab, kid="lab-9999"), {}, 401, "unknown_kid"),
    "signed_by_other_tenant_key_with_wrong_kid": (
        lambda lab: _ok(lab, key=PRODUCER_B, kid="lab-2026"), {}, 401, "invalid_signature"),
    "top_level_array": (
        lambda lab: (resign(lab, b"[1,2]"), b"[1,2]", TELEMETRY_PATH, None), {}, 422,
        "malformed_json"),
    "invalid_utf8": (
        lambda lab: (resign(lab, b'{"a":"\xff"}'), b'{"a":"\xff"}', TELEMETRY_PATH, None), {},
        422, "malformed_json"),
    "nan_in_body": (
        lambda lab: (resign(lab, b'{"a":NaN}'), b'{"a":NaN}', TELEMETRY_PATH, None), {},
        422, "malformed_json"),
    "non_canonical_key_order": (
        lambda lab: (resign(lab, b'{"b":1,"a":2}'), b'{"b":1,"a":2}', TELEMETRY_PATH, None),
        {}, 422, "non_canonical_body"),
    "schema_missing_payload": (
        lambda lab: _ok(lab, body={k: v for k, v in body_for(TELEMETRY_PATH).items()
                                   if k != "payload"}), {}, 422, "schema_violation"),
    "timestamp_as_float": (
        lambda lab: (resign(lab, b := json.dumps(
            {**body_for(TELEMETRY_PATH), "timestamp": float(NOW), "nonce": "nonce-raw-0001"},
            sort_keys=True, separators=(",", ":")).encode()), b, TELEMETRY_PATH, None),
        {}, 422, "schema_violation"),
    "graph_extra_member": (
        lambda lab: _ok(lab, GRAPH_PATH, body=body_for(GRAPH_PATH, extra=1)), {}, 422,
        "schema_violation"),
    "query_limit_too_big": (
        lambda lab: _ok(lab, QUERY_PATH, body=body_for(QUERY_PATH, limit=1001)), {}, 422,
        "schema_violation"),
    "query_for_unmapped_operator": (
        lambda lab: _ok(lab, QUERY_PATH, body=body_for(QUERY_PATH, operator_id="op-404")),
        {}, 403, "mapping_violation"),
    "graph_tenant_outside_identity": (
        lambda lab: _ok(lab, GRAPH_PATH, body=body_for(GRAPH_PATH, operator_id="op-002",
                                                       tenant_id=TENANT_B),
                        key=PRODUCER_B, kid="lab-b-2026"), {}, 403, "mapping_violation"),
    "graph_schema_version": (
        lambda lab: _ok(lab, GRAPH_PATH, body=body_for(GRAPH_PATH,
                                                       schema_version="execution.graph.v2")),
        {}, 422, "schema_version_not_allowed"),
    "telemetry_schema_version_outside_configured_list": (
        lambda lab: _ok(lab), {"allowed_schema_versions": ["2.0"]}, 422,
        "schema_version_not_allowed"),
}


@pytest.mark.parametrize("name", list(ROWS))
async def test_rejection_row(store, name):
    build, config, status, code = ROWS[name]
    lab = Lab(store, **config)
    headers, body, path, peer = build(lab)
    peer = None if peer == "none" else (peer or PIN)
    got_status, got_code, exc = await lab.send(headers, body, path, peer=peer)
    assert (got_status, got_code) == (status, code), getattr(exc, "detail", exc)
    nonce = CIMultiDict(headers).get("X-Telemetry-Nonce", "")
    for tenant in (TENANT, TENANT_B):
        assert not await store.is_claimed(IDENTITY, tenant, nonce, NOW)
        for kind in ("finding", "graph", "feedback"):
            assert await store.list_records(kind, tenant) == []


async def test_every_route_accepts_a_good_request(store):
    lab = Lab(store)
    for path in (TELEMETRY_PATH, GRAPH_PATH, QUERY_PATH):
        status, code, ctx = await lab.send(*lab.signed(path), path)
        assert (status, code) == (202, None), getattr(ctx, "detail", None)


async def test_schema_violation_names_the_pointer(store):
    lab = Lab(store)
    body = body_for(TELEMETRY_PATH)
    body["payload"] = {**body["payload"], "mitre_techniques": ["X1059"]}
    _, code, exc = await lab.send(*lab.signed(body=body))
    assert code == "schema_violation"
    assert exc.extra["pointer"] == "/payload/mitre_techniques/0"


async def test_attestation_mismatch_after_anchor(store):
    """A graph for an anchored execution with another hash → 403, and nothing written."""
    lab = Lab(store)
    assert (await lab.send(*lab.signed()))[:2] == (202, None)
    graph = body_for(GRAPH_PATH, attestation_measurement_hash=ATT_OTHER)
    headers, raw = lab.signed(GRAPH_PATH, body=graph, nonce="nonce-graph-0001")
    status, code, _ = await lab.send(headers, raw, GRAPH_PATH)
    assert (status, code) == (403, "attestation_mismatch")
    assert not await store.is_claimed(IDENTITY, TENANT, "nonce-graph-0001", NOW)
    assert await store.list_records("graph", TENANT) == []
    # anchoring switched off: the same graph is accepted
    status, code, _ = await Lab(store, anchor_attestation=False).send(headers, raw, GRAPH_PATH)
    assert (status, code) == (202, None)


async def test_rate_limited_after_quota_with_retry_after(store):
    lab = Lab(store, rate_limit_per_minute=2)
    for _ in range(2):
        assert (await lab.send(*lab.signed()))[:2] == (202, None)
    headers, raw = lab.signed()
    status, code, exc = await lab.send(headers, raw)
    assert (status, code) == (429, "rate_limited")
    assert 0 < exc.extra["retry_after"] <= 60
    assert not await store.is_claimed(IDENTITY, TENANT, headers["X-Telemetry-Nonce"], NOW)


async def test_redis_down_is_replay_store_unavailable(redis_server, redis_url):
    store = open_store(redis_url)
    await store.open()
    lab = Lab(store)
    try:
        redis_server.stop()
        status, code, _ = await lab.send(*lab.signed())
        assert (status, code) == (503, "replay_store_unavailable")
        redis_server.start()
        assert (await lab.send(*lab.signed()))[:2] == (202, None)
    finally:
        await store.close()


async def test_sqlite_locked_is_replay_store_unavailable(sqlite_url):
    """Another process-like connection holds the write lock past busy_timeout: fail closed."""
    store = open_store(sqlite_url, busy_timeout_ms=100)
    await store.open()
    blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        headers, raw = Lab(store).signed()
        status, code, _ = await Lab(store).send(headers, raw)
        assert (status, code) == (503, "replay_store_unavailable")
        blocker.execute("ROLLBACK")
        assert not await store.is_claimed(IDENTITY, TENANT, headers["X-Telemetry-Nonce"], NOW)
        assert (await Lab(store).send(headers, raw))[:2] == (202, None)
    finally:
        blocker.close()
        await store.close()


async def test_sqlite_full_is_store_unavailable_and_keeps_the_nonce(sqlite_url):
    """A real SQLITE_FULL (max_page_count reached) mid-write: 503, nonce not consumed."""
    store = open_store(sqlite_url)
    await store.open()
    try:
        lab = Lab(store)
        assert (await lab.send(*lab.signed()))[:2] == (202, None)
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
        headers, raw = lab.signed(body=body_for(
            TELEMETRY_PATH, payload={**body_for(TELEMETRY_PATH)["payload"],
                                     "description": "x" * 20000}))
        status, code, _ = await lab.send(headers, raw)
        assert (status, code) == (503, "store_unavailable")
        assert not await store.is_claimed(IDENTITY, TENANT, headers["X-Telemetry-Nonce"], NOW)
        store._db.execute("PRAGMA max_page_count = 1073741823")
        assert (await lab.send(headers, raw))[:2] == (202, None)
    finally:
        await store.close()
