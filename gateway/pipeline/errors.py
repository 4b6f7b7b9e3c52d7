"""The gateway's error taxonomy (PROTOCOL.md §4): one class per ``error`` code.

Every class carries the HTTP ``status`` and the machine ``error`` code; the audit
``category`` marks identity/signature/key failures as security events. One place
(``gateway.http.app``) maps these to HTTP; anything else is a 500 ``internal_error``.
Grouped by cause, as in python-tuf: the peer's fault is 4xx, our dependencies' 503.
"""

from __future__ import annotations

from typing import Any, ClassVar

AUTHENTICATION = "authentication"  # ECS event.category for security events
WEB = "web"
DATABASE = "database"
IAM = "iam"  # tenant-boundary decisions


class GatewayError(Exception):
    """Base of every documented rejection."""

    status: ClassVar[int] = 500
    error: ClassVar[str] = "internal_error"
    category: ClassVar[str] = WEB

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra  # extra members of the error body (duplicate_of, pointer, ...)

    def body(self, request_id: str) -> dict[str, Any]:
        return error_body(request_id, self.error, self.detail, **self.extra)


def error_body(request_id: str, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The one error body shape (PROTOCOL.md §4, v1.1), for every refusal on the wire.

    ``error``/``detail`` are the v1 members; ``status`` and ``errors`` are what the
    SpectraStrike client reads (``errors[0].code``). ``extra`` (``duplicate_of``,
    ``pointer``, ...) sits beside them and can never replace them.
    """
    out: dict[str, Any] = {
        "accepted": False,
        "status": "rejected",
        "request_id": request_id,
        "error": code,
        "detail": detail,
        "errors": [{"code": code, "message": detail}],
    }
    for name, value in extra.items():
        out.setdefault(name, value)
    return out


# -- step 2: transport-level input ------------------------------------------------------
class UnsupportedMediaType(GatewayError):
    status, error = 415, "unsupported_media_type"


class BodyTooLarge(GatewayError):
    status, error = 413, "body_too_large"


class EmptyBody(GatewayError):
    status, error = 422, "empty_body"


# -- steps 3-6, 8: who is speaking (security events) ----------------------------------
class AuthenticationError(GatewayError):
    status, category = 401, AUTHENTICATION


class IdentityRejected(AuthenticationError):
    error = "identity_rejected"


class MalformedSignatureHeaders(AuthenticationError):
    error = "malformed_signature_headers"


class TimestampOutOfWindow(AuthenticationError):
    error = "timestamp_out_of_window"


class UnknownKid(AuthenticationError):
    error = "unknown_kid"


class KeyNotValid(AuthenticationError):
    error = "key_not_valid"


class InvalidSignature(AuthenticationError):
    error = "invalid_signature"


class HeaderBodyMismatch(AuthenticationError):
    error = "header_body_mismatch"


# -- steps 7, 10: what was said ---------------------------------------------------------
class MalformedJson(GatewayError):
    status, error = 422, "malformed_json"


class NonCanonicalBody(GatewayError):
    status, error = 422, "non_canonical_body"


class SchemaViolation(GatewayError):
    status, error = 422, "schema_violation"


class SchemaVersionNotAllowed(GatewayError):
    status, error = 422, "schema_version_not_allowed"


# -- steps 9, 11, 12: what this speaker may say -----------------------------------------
class MappingViolation(GatewayError):
    status, error, category = 403, "mapping_violation", IAM


class RateLimited(GatewayError):
    status, error = 429, "rate_limited"


class AttestationMismatch(GatewayError):
    status, error = 403, "attestation_mismatch"


class ExecutionNotOwned(GatewayError):
    """[v1.1] The execution was anchored by another service identity (§5)."""

    status, error, category = 403, "execution_not_owned", IAM


# -- steps 13, 14: the single write -----------------------------------------------------
class ReplayedNonce(GatewayError):
    status, error = 409, "replayed_nonce"


class ReplayStoreUnavailable(GatewayError):
    status, error, category = 503, "replay_store_unavailable", DATABASE


class StoreUnavailable(GatewayError):
    status, error, category = 503, "store_unavailable", DATABASE


class RequestTimeout(GatewayError):
    """Not in PROTOCOL.md §4: the body arrived too slowly (resource protection)."""

    status, error = 408, "request_timeout"


class BadRequest(GatewayError):
    """Not a §4 step: HTTP the server could not parse (request line, headers, framing)."""

    status, error = 400, "bad_request"


class ClientDisconnected(GatewayError):
    """Not an answer (nobody is left to read one): the connection closed before the whole
    body arrived, by the client or shed by the connection guard. Audited with 499."""

    status, error = 499, "client_disconnected"


class AuditUnavailable(GatewayError):
    """Not in PROTOCOL.md §4: the audit log cannot be written, so nothing is decided."""

    status, error, category = 503, "audit_unavailable", DATABASE


class InternalError(GatewayError):
    status, error = 500, "internal_error"


# every code answered on the wire (ClientDisconnected is only audited: nobody is left)
ALL_ERRORS: tuple[type[GatewayError], ...] = (
    UnsupportedMediaType, BodyTooLarge, EmptyBody, IdentityRejected,
    MalformedSignatureHeaders, TimestampOutOfWindow, UnknownKid, KeyNotValid,
    InvalidSignature, MalformedJson, NonCanonicalBody, SchemaViolation, HeaderBodyMismatch,
    MappingViolation, SchemaVersionNotAllowed, RateLimited, AttestationMismatch,
    ExecutionNotOwned, ReplayedNonce, ReplayStoreUnavailable, StoreUnavailable, RequestTimeout,
    BadRequest, AuditUnavailable, InternalError,
)
