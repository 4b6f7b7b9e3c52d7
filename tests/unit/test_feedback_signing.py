"""The two signing inputs (PROTOCOL.md §3 request, §6 feedback) against the vectors.

- feedback_v1.json: our ``feedback_signing_input`` rebuilds each vector's signing input
  from the response, and our signer (Ed25519 is deterministic) reproduces each signature.
- interop/: bytes captured from the legacy SpectraStrike producer and VectorVue gateway;
  our canonical form and request signing input must match them byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from conftest import load_vectors

from keyring.ed25519 import PrivateKey, verify
from keyring.keys import parse_jwks
from schemas.canonical import dumps, loads
from schemas.signing import (
    FEEDBACK_SCHEMA_VERSION,
    SIGNATURE_ALGORITHM,
    feedback_signing_input,
    request_signing_input,
)

FEEDBACK = load_vectors("feedback_v1.json")
CASES = FEEDBACK["cases"]
SEEDS = FEEDBACK["feedback_private_key_seed_hex"]
RING = parse_jwks(FEEDBACK["keyring"])

# §6 order: these checks run before the signature, so a vector rejected by one of them
# says nothing about its signature.
BEFORE_SIGNATURE = {"malformed_response", "unsupported_algorithm", "unknown_kid"}


def _built_input(case: dict) -> bytes:
    """What a verifier computes: the tenant it asked for + the response's own fields."""
    r = case["response"]
    return feedback_signing_input(
        case["requested_tenant"], r["signed_at"], r["nonce"], r["schema_version"], r["kid"],
        r["data"],
    )


def test_feedback_vectors_present() -> None:
    assert len(CASES) >= 20
    assert sum(c["expect"] == "ok" for c in CASES) >= 5
    assert len({c["name"] for c in CASES}) == len(CASES)


def test_feedback_seeds_match_keyring() -> None:
    assert set(SEEDS) == set(RING)
    for kid, seed in SEEDS.items():
        assert PrivateKey(bytes.fromhex(seed)).public == RING[kid].public


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_feedback_vector_signer_reproduces(case: dict, feedback_signer) -> None:
    """Each vector signature reproduced by the file key and by the same seed inside a
    SoftHSM2 token (``feedback_signer``: signing through PKCS#11)."""
    r = case["response"]
    signing_input = case["signing_input"].encode("utf-8")
    if case["expect"] == "ok":
        assert _built_input(case) == signing_input
        assert r["schema_version"] == FEEDBACK_SCHEMA_VERSION
        assert r["signature_algorithm"] == SIGNATURE_ALGORITHM
    seed = SEEDS.get(r["kid"])
    if seed is None:
        pytest.skip(f"no private seed for kid {r['kid']!r} in the vectors")
    if "signature" not in r:
        pytest.skip("the response carries no signature to reproduce")
    signature = base64.b64decode(r["signature"], validate=True)
    reproduced = feedback_signer(r["kid"]).sign(signing_input)
    assert len(reproduced) == 64
    if case["expect"] == "ok":
        assert reproduced == signature
    else:
        # Either the vector carries a genuine signature over its signing_input (and is
        # rejected for another reason), or it is a forgery meant to fail verification.
        assert reproduced == signature or case["expect"] == "invalid_signature"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_feedback_vector_verification_outcome(case: dict) -> None:
    """Verifying over the input a verifier builds agrees with the expected outcome."""
    r = case["response"]
    if case["expect"] in BEFORE_SIGNATURE:
        pytest.skip(f"rejected ({case['expect']}) before the signature is checked")
    signature = base64.b64decode(r["signature"], validate=True)
    outcome = verify(RING[r["kid"]].public, signature, _built_input(case))
    assert outcome is (case["expect"] != "invalid_signature")


def test_feedback_signing_input_format() -> None:
    got = feedback_signing_input("t-1", 12, "n.x", "feedback.response.v1", "kid:1",
                                 [{"b": 0.5, "a": "\u00e9"}])
    assert got == b't-1|12|n.x|feedback.response.v1|kid:1|[{"a":"\\u00e9","b":0.5}]'


# -- interop: feedback responses from the legacy gateway --------------------------------

INTEROP_FEEDBACK = ["feedback_01.json", "feedback_02.json"]


@pytest.mark.parametrize("name", INTEROP_FEEDBACK)
def test_interop_feedback_signing_input(name: str) -> None:
    v = load_vectors(f"interop/{name}")
    r = v["response_json"]
    assert r["kid"] == v["kid"]
    built = feedback_signing_input(v["tenant_id"], r["signed_at"], r["nonce"],
                                   r["schema_version"], r["kid"], r["data"])
    assert built == v["signing_input"].encode("utf-8")
    canonical_data = dumps(r["data"])
    assert built.endswith(b"|" + canonical_data)
    assert b'"confidence":0.55' in canonical_data
    assert b'"confidence":0.82' in canonical_data


@pytest.mark.parametrize("name", INTEROP_FEEDBACK)
def test_interop_feedback_signature(name: str) -> None:
    v = load_vectors(f"interop/{name}")
    r = v["response_json"]
    public = base64.b64decode(v["feedback_verify_public_key_b64"], validate=True)
    signature = base64.b64decode(r["signature"], validate=True)
    signing_input = v["signing_input"].encode("utf-8")
    assert verify(public, signature, signing_input) is True
    key = PrivateKey(base64.b64decode(v["feedback_private_seed_b64_TEST_ONLY"], validate=True))
    assert key.public == public
    assert key.sign(signing_input) == signature
    tampered = signing_input.replace(b"0.55", b"0.56", 1)
    assert tampered != signing_input
    assert verify(public, signature, tampered) is False


@pytest.mark.parametrize("name", INTEROP_FEEDBACK)
def test_interop_feedback_body_parses_to_response_json(name: str) -> None:
    v = load_vectors(f"interop/{name}")
    body = base64.b64decode(v["response_http"]["body_b64"], validate=True)
    assert loads(body) == v["response_json"]


# -- interop: signed requests from the legacy producer ----------------------------------

def _interop_requests() -> list[tuple[str, dict, str]]:
    rows: list[tuple[str, dict, str]] = []
    for name in ("telemetry_01", "telemetry_02", "telemetry_03", "replay_01"):
        v = load_vectors(f"interop/{name}.json")
        rows.append((name, v["request"], v["producer_public_key_b64"]))
    for graph in load_vectors("interop/execution_graph_requests.json"):
        rows.append((graph["vector_id"], graph["request"], graph["producer_public_key_b64"]))
    for name in INTEROP_FEEDBACK:
        q = load_vectors(f"interop/{name}")["query_request"]
        rows.append((f"{name[:-5]}_query", q, q["producer_public_key_b64"]))
    return rows


INTEROP_REQUESTS = _interop_requests()


def test_interop_request_inventory() -> None:
    ids = [row[0] for row in INTEROP_REQUESTS]
    assert ids == ["telemetry_01", "telemetry_02", "telemetry_03", "replay_01",
                   "graph-01", "graph-02", "feedback_01_query", "feedback_02_query"]


def _header(request: dict, name: str) -> str:
    values = [v for k, v in request["headers"] if k.lower() == name.lower()]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


@pytest.mark.parametrize(
    ("request_", "public_b64"),
    [(req, pk) for _, req, pk in INTEROP_REQUESTS],
    ids=[row[0] for row in INTEROP_REQUESTS],
)
def test_interop_request_signing_input(request_: dict, public_b64: str) -> None:
    body = base64.b64decode(request_["body_b64"], validate=True)
    assert hashlib.sha256(body).hexdigest() == request_["body_sha256"]
    timestamp = _header(request_, "X-Telemetry-Timestamp")
    nonce = _header(request_, "X-Telemetry-Nonce")
    signing_input = request_signing_input(timestamp, nonce, body)
    assert signing_input == base64.b64decode(request_["signing_input_b64"], validate=True)

    public = base64.b64decode(public_b64, validate=True)
    signature = base64.b64decode(_header(request_, "X-Telemetry-Signature"), validate=True)
    assert verify(public, signature, signing_input) is True
    # the signature covers every part of the input
    other_nonce = request_signing_input(timestamp, nonce + "x", body)
    assert verify(public, signature, other_nonce) is False
    assert verify(public, signature, request_signing_input(timestamp, nonce, body + b" ")) is False


@pytest.mark.parametrize(
    "request_", [req for _, req, _ in INTEROP_REQUESTS], ids=[row[0] for row in INTEROP_REQUESTS]
)
def test_interop_request_body_is_canonical(request_: Any) -> None:
    """The legacy producer already sends the canonical form (§3): it passes our check."""
    body = base64.b64decode(request_["body_b64"], validate=True)
    value = loads(body)
    assert isinstance(value, dict)
    assert dumps(value) == body
