"""The emitter's feedback verifier: PROTOCOL.md §6 steps 1-8, in order, pure.

Each step is one function below, in §6 order; the first failing step raises
:class:`FeedbackRejected` whose ``code`` names it (fail closed: nothing is applied).
[v1.1] An adjustment naming an execution this emitter never sent is not a rejection: it
lands in :attr:`VerifiedFeedback.skipped` (reason :data:`SKIP_UNKNOWN_EXECUTION`).
Step 9 (claim the response nonce, then apply) is the only write and lives in
:mod:`emitter.ledger`; call it only after :func:`check_feedback` returned, so a forged
or stale response can never burn a nonce. Decisions where §6 is terse: docs/EMITTER_VERIFY.md.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyring.ed25519 import verify as ed25519_verify
from keyring.keys import Key, Keyring, KeyringError, load_jwks
from schemas.signing import FEEDBACK_SCHEMA_VERSION, SIGNATURE_ALGORITHM, feedback_signing_input

__all__ = [
    "CODES", "SKIP_UNKNOWN_EXECUTION", "Expectation", "FeedbackRejected", "VerifiedFeedback",
    "check_feedback", "load_feedback_keyring",
]

#: §6 rejection codes, in check order (``replayed_nonce`` is raised by the ledger).
CODES = (
    "malformed_response", "unsupported_algorithm", "unknown_kid", "invalid_signature",
    "timestamp_out_of_window", "nonce_not_bound", "tenant_mismatch",
    "attestation_mismatch", "replayed_nonce",
)
#: §6 step 8 [v1.1]: an adjustment for an execution this emitter never sent is skipped
#: (not applied) under this reason, and the rest of a verified answer applies.
SKIP_UNKNOWN_EXECUTION = "unknown_execution"
ADJUSTMENT_SCHEMA_VERSION = "feedback.adjustment.v1"
_TEXT = ("tenant_id", "execution_fingerprint", "target_urn", "action", "control",
         "attestation_measurement_hash")  # non-empty strings (§5)
_ADJUSTMENT_MEMBERS = frozenset(
    {*_TEXT, "rationale", "confidence", "ttl_seconds", "timestamp", "schema_version"})
# 64 bytes in standard padded base64 is 88 characters; the last one before "==" carries
# 2 significant bits, so only A/Q/g/w are canonical (one encoding per signature).
_SIGNATURE_B64 = re.compile(r"[A-Za-z0-9+/]{85}[AQgw]==")
_NONCE_SUFFIX = re.compile(r"[A-Za-z0-9_-]{16,128}")
MAX_TIMESTAMP = 2**63  # an adjustment's timestamp is below it (a signed 64-bit integer)


class FeedbackRejected(Exception):
    """A §6 rejection: ``code`` is one of :data:`CODES`, ``detail`` one human sentence."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown §6 rejection code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Expectation:
    """What the emitter itself knows: the tenant, nonce and ``limit`` it asked with
    (an answer with more adjustments than asked for is malformed), and the attestation
    hash the gateway accepted from it for each execution fingerprint."""

    tenant_id: str
    request_nonce: str
    sent: Mapping[str, str]
    limit: int | None = None


@dataclass(frozen=True)
class VerifiedFeedback:
    """A verified answer: ``adjustments`` are the ones to apply; ``skipped`` the ones
    naming an execution this emitter never sent (§6 step 8, reason ``unknown_execution``),
    in answer order. Together they are the answer's ``data``."""

    kid: str
    nonce: str
    signed_at: int
    adjustments: tuple[dict[str, Any], ...]
    skipped: tuple[dict[str, Any], ...] = ()

    @property
    def skipped_executions(self) -> list[str]:
        """The execution fingerprints of :attr:`skipped`, in answer order."""
        return [adj["execution_fingerprint"] for adj in self.skipped]


def load_feedback_keyring(path: str | Path) -> Keyring:
    """The emitter's feedback keys (JWKS). Producer keys (``identity``/``tenants``) are
    refused: a feedback keyring holds only the gateway's feedback keys."""
    ring = load_jwks(path)
    for key in ring.values():
        if key.identity is not None or key.tenants:
            raise KeyringError(f"{path}: key {key.kid!r} is a producer key (identity/tenants)"
                               " — not allowed in a feedback keyring")
    return ring


def check_feedback(
    response: Any, expect: Expectation, *, keyring: Keyring, now: int, skew_s: int = 30,
    legacy_unbound_nonce: bool = False,
) -> VerifiedFeedback:
    """§6 steps 1-8 over a parsed response; raise :class:`FeedbackRejected` at the first
    failure. No I/O, no state: the replay claim (step 9) is the ledger's."""
    data = _1_well_formed(response, expect.limit)
    _2_algorithm(response)
    key = _3_key(response["kid"], keyring, now)
    _4_signature(response, data, key, expect.tenant_id)
    _5_fresh(response["signed_at"], now, skew_s)
    if not legacy_unbound_nonce:
        _6_nonce_bound(response["nonce"], expect.request_nonce)
    _7_tenant(data, expect.tenant_id)
    known, unknown = _8_attestation(data, expect.sent)
    return VerifiedFeedback(kid=response["kid"], nonce=response["nonce"],
                            signed_at=response["signed_at"],
                            adjustments=tuple(dict(adj) for adj in known),
                            skipped=tuple(dict(adj) for adj in unknown))


# -- 1. malformed_response ---------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _1_well_formed(response: Any, limit: int | None = None) -> list[dict[str, Any]]:
    if not isinstance(response, Mapping):
        raise FeedbackRejected("malformed_response", "the response is not a JSON object")
    for name in ("signature", "kid", "nonce", "schema_version"):
        if not isinstance(response.get(name), str):
            raise FeedbackRejected("malformed_response", f"{name} missing or not a string")
    if not _is_int(response.get("signed_at")):
        raise FeedbackRejected("malformed_response", "signed_at missing or not an integer")
    if response["schema_version"] != FEEDBACK_SCHEMA_VERSION:
        raise FeedbackRejected("malformed_response",
                               f"schema_version is not {FEEDBACK_SCHEMA_VERSION}")
    data = response.get("data")
    if not isinstance(data, list):
        raise FeedbackRejected("malformed_response", "data missing or not an array")
    if limit is not None and len(data) > limit:
        raise FeedbackRejected("malformed_response",
                               f"{len(data)} adjustments for a query with limit {limit}")
    for index, adjustment in enumerate(data):
        problem = _adjustment_problem(adjustment)
        if problem:
            raise FeedbackRejected("malformed_response", f"data[{index}]: {problem}")
    return data


def _adjustment_problem(adj: Any) -> str | None:
    """Why one adjustment is not a §5 ``feedback.adjustment.v1`` object, else None."""
    if not isinstance(adj, dict):
        return "not an object"
    missing = _ADJUSTMENT_MEMBERS - adj.keys()
    if missing:
        return f"missing {sorted(missing)}"
    if adj.keys() - _ADJUSTMENT_MEMBERS:
        return f"unknown member(s) {sorted(adj.keys() - _ADJUSTMENT_MEMBERS)}"
    for name in _TEXT:
        if not isinstance(adj[name], str) or not adj[name]:
            return f"{name} is not a non-empty string"
    if not isinstance(adj["rationale"], str):
        return "rationale is not a string"
    confidence = adj["confidence"]  # compared, never converted: 10**400 cannot overflow
    if not (isinstance(confidence, int | float) and not isinstance(confidence, bool)
            and 0 <= confidence <= 1):  # NaN fails both comparisons
        return "confidence is not a number in [0, 1]"
    if not _is_int(adj["ttl_seconds"]) or not 60 <= adj["ttl_seconds"] <= 86400:
        return "ttl_seconds is not an integer in [60, 86400]"
    if not _is_int(adj["timestamp"]) or not 0 <= adj["timestamp"] < MAX_TIMESTAMP:
        return "timestamp is not Unix seconds in [0, 2**63)"
    if adj["schema_version"] != ADJUSTMENT_SCHEMA_VERSION:
        return f"schema_version is not {ADJUSTMENT_SCHEMA_VERSION}"
    return None


# -- 2. unsupported_algorithm ------------------------------------------------------------

def _2_algorithm(response: Mapping[str, Any]) -> None:
    alg = response.get("signature_algorithm")
    if not (isinstance(alg, str) and alg == SIGNATURE_ALGORITHM):
        raise FeedbackRejected("unsupported_algorithm",
                               f"signature_algorithm must be exactly {SIGNATURE_ALGORITHM}")


# -- 3. unknown_kid ----------------------------------------------------------------------

def _3_key(kid: str, keyring: Keyring, now: int) -> Key:
    key = keyring.get(kid)
    if key is None:
        raise FeedbackRejected("unknown_kid", "kid is not in the feedback keyring")
    if not key.valid_at(now):
        raise FeedbackRejected("unknown_kid", "the key is revoked or outside its validity window")
    return key


# -- 4. invalid_signature ----------------------------------------------------------------

def _decode_signature(text: str) -> bytes | None:
    """Standard padded base64 of exactly 64 bytes (canonical), else None."""
    if not _SIGNATURE_B64.fullmatch(text):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _4_signature(response: Mapping[str, Any], data: list, key: Key, tenant_id: str) -> None:
    signature = _decode_signature(response["signature"])
    try:  # the tenant the emitter asked for, never one named by the response
        message = feedback_signing_input(tenant_id, response["signed_at"], response["nonce"],
                                         response["schema_version"], response["kid"], data)
    except (ValueError, TypeError, RecursionError):
        message = None
    if signature is None or message is None or not ed25519_verify(key.public, signature,
                                                                   message):
        raise FeedbackRejected("invalid_signature",
                               "the signature does not verify for the requested tenant")


# -- 5. timestamp_out_of_window ----------------------------------------------------------

def _5_fresh(signed_at: int, now: int, skew_s: int) -> None:
    if abs(now - signed_at) > skew_s:
        raise FeedbackRejected("timestamp_out_of_window",
                               f"signed_at is {signed_at - now:+d}s from now (allowed ±{skew_s}s)")


# -- 6. nonce_not_bound ------------------------------------------------------------------

def _6_nonce_bound(nonce: str, request_nonce: str) -> None:
    prefix = request_nonce + "."
    if not (nonce.startswith(prefix) and _NONCE_SUFFIX.fullmatch(nonce[len(prefix):])):
        raise FeedbackRejected("nonce_not_bound", "the response nonce is not "
                               "<request nonce>.<16-128 url-safe characters>")


# -- 7. tenant_mismatch ------------------------------------------------------------------

def _7_tenant(data: list[dict[str, Any]], tenant_id: str) -> None:
    for index, adjustment in enumerate(data):
        if adjustment["tenant_id"] != tenant_id:
            raise FeedbackRejected("tenant_mismatch",
                                   f"data[{index}] is for another tenant than the one asked")


# -- 8. attestation_mismatch -------------------------------------------------------------

def _8_attestation(data: list[dict[str, Any]], sent: Mapping[str, str]
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """→ (adjustments for executions this emitter sent, adjustments to skip). [v1.1] An
    execution it never sent (another agent of the same identity, a wiped state dir) is
    skipped, not a rejection; one it sent with another hash rejects the whole answer."""
    sent_lower = {fp.lower(): att.lower() for fp, att in sent.items()}  # hex: any case
    known: list[dict[str, Any]] = []
    unknown: list[dict[str, Any]] = []
    for index, adjustment in enumerate(data):
        expected = sent_lower.get(adjustment["execution_fingerprint"].lower())
        if expected is None:
            unknown.append(adjustment)
            continue
        known.append(adjustment)
        if adjustment["attestation_measurement_hash"].lower() != expected:
            raise FeedbackRejected("attestation_mismatch",
                                   f"data[{index}] attestation hash differs from the one sent")
    return known, unknown
