"""TLS contexts and certificate fingerprints (PROTOCOL.md §2), stdlib ``ssl`` only.

* ``server_context``: TLS 1.3 only, a client certificate chaining to ``client_ca`` is
  required (no certificate, an untrusted chain, a certificate without clientAuth, or
  TLS < 1.3 fail the handshake: no HTTP answer), no compression, no session resumption
  (every connection presents and verifies the client certificate again).
* ``client_context``: TLS 1.3 only, the server verified against ``ca`` with hostname check.
* ``peer_cert_sha256``: the sha256 of the peer's leaf DER taken from the live TLS session;
  the gateway pins identities with it, never with anything a header says.
* ``peer_cert_pins``: both pin forms of the live peer leaf (one DER read): its sha256 hex
  and ``spki:<base64 sha256 of its SubjectPublicKeyInfo DER>`` (v1.1, HPKP / Envoy
  ``verify_certificate_spki`` form: it survives a renewal with the same key).
* ``pin_matches``: either form against a pin list, constant time over every pin.
* ``server_cert_sha256_matches``: the emitter's server pinning (either form).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class TlsConfigError(ValueError):
    """A TLS file that cannot be used; the message is one line naming the file."""


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _reason(exc: ssl.SSLError) -> str:
    return exc.reason or str(exc)


def _no_password() -> bytes:
    raise TlsConfigError("encrypted private key: fedgate needs an unencrypted PKCS#8 key")


def _load_verify(ctx: ssl.SSLContext, ca: Path, what: str) -> None:
    if b"-----BEGIN CERTIFICATE-----" not in _read(ca, what):
        raise TlsConfigError(f"{what} {ca}: no PEM certificate found")
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{what} {ca}: cannot load ({_reason(exc)})") from None


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    if b"-----BEGIN CERTIFICATE-----" not in _read(cert, "certificate"):
        raise TlsConfigError(f"certificate {cert}: no PEM certificate found")
    key_file = cert if key is None else key
    key_pem = _read(key_file, "private key")
    if b"PRIVATE KEY-----" not in key_pem:
        raise TlsConfigError(f"private key {key_file}: no PEM private key found")
    if b"ENCRYPTED" in key_pem:
        raise TlsConfigError(f"private key {key_file}: encrypted keys are not supported")
    try:
        ctx.load_cert_chain(str(cert), str(key_file), password=_no_password)
    except TlsConfigError as exc:
        raise TlsConfigError(f"private key {key_file}: {exc}") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                f"private key {key_file} does not match certificate {cert}") from None
        raise TlsConfigError(
            f"cannot load certificate {cert} with key {key_file} ({_reason(exc)})") from None


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION
    # RFC 5280 strictness (Python 3.13's default): rejects malformed certificates.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def server_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """The gateway's context: TLS 1.3 only, client certificates required against client_ca."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0  # TLS 1.3: issue no session tickets, so no resumption at all
    _load_verify(ctx, client_ca, "client CA")
    _load_chain(ctx, cert, key)
    return ctx


def client_context(ca: Path, cert: Path | None = None,
                   key: Path | None = None) -> ssl.SSLContext:
    """The emitter's context: TLS 1.3 only, server verified against ``ca`` with hostname
    check; ``cert``/``key`` the client certificate (``key`` may live in ``cert``)."""
    if key is not None and cert is None:
        raise TlsConfigError(f"private key {key} given without a client certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    _harden(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_verify(ctx, ca, "CA")
    if cert is not None:
        _load_chain(ctx, cert, key)
    return ctx


def peer_cert_sha256(ssl_object: Any) -> str | None:
    """sha256 (lowercase hex) of the peer's leaf certificate DER, or None without one.

    ``ssl_object`` is ``transport.get_extra_info("ssl_object")`` (an ``ssl.SSLObject`` or
    ``ssl.SSLSocket``); None (plain TCP) gives None.
    """
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return hashlib.sha256(der).hexdigest()


SPKI_PREFIX = "spki:"
#: ``spki:`` + canonical standard base64 of 32 bytes (44 characters, one ``=``; the last
#: character before it carries 4 significant bits, so only these 16 are canonical).
SPKI_PIN_RE = re.compile(r"spki:[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")
CERT_PIN_RE = re.compile(r"[0-9a-f]{64}")


def is_pin(pin: object) -> bool:
    """A certificate pin (lowercase sha256 hex) or an SPKI pin (``spki:<base64>``)."""
    return isinstance(pin, str) and bool(CERT_PIN_RE.fullmatch(pin) or SPKI_PIN_RE.fullmatch(pin))


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """One DER element at ``pos``: (tag, content start, content end); ValueError if cut."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length, pos = der[pos], der[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > len(der):
            raise ValueError("bad DER length")
        length, pos = int.from_bytes(der[pos:pos + count], "big"), pos + count
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def spki_der(cert_der: bytes) -> bytes:
    """The exact SubjectPublicKeyInfo bytes inside a certificate's DER (RFC 5280
    ``tbsCertificate``: [0] version?, serial, signature, issuer, validity, subject,
    subjectPublicKeyInfo), never re-encoded. ValueError on anything else, truncation
    included (never IndexError: ``peer_cert_pins`` catches ValueError only)."""
    _, start, _ = _tlv(cert_der, 0)  # Certificate ::= SEQUENCE
    tag, pos, tbs_end = _tlv(cert_der, start)  # tbsCertificate ::= SEQUENCE
    if tag != 0x30:
        raise ValueError("not a certificate")
    if pos >= tbs_end:
        raise ValueError("truncated DER")
    if cert_der[pos] == 0xA0:  # explicit version
        pos = _tlv(cert_der, pos)[2]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        pos = _tlv(cert_der, pos)[2]
    tag, _, end = _tlv(cert_der, pos)
    if tag != 0x30 or end > tbs_end:
        raise ValueError("no subjectPublicKeyInfo")
    return cert_der[pos:end]


def spki_pin(cert_der: bytes) -> str:
    """``spki:<standard base64 of sha256(SubjectPublicKeyInfo DER)>`` of a certificate."""
    digest = hashlib.sha256(spki_der(cert_der)).digest()
    return SPKI_PREFIX + base64.b64encode(digest).decode("ascii")


def peer_cert_pins(ssl_object: Any) -> tuple[str | None, str | None]:
    """(sha256 hex, ``spki:`` pin) of the peer's leaf certificate from the live TLS
    session, from one DER read; (None, None) without a certificate."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None, None
    try:
        spki = spki_pin(der)
    except ValueError:  # cannot happen for a certificate the handshake verified
        spki = None
    return hashlib.sha256(der).hexdigest(), spki


def pin_matches(pins: Iterable[str], cert_sha256: str | None, spki: str | None) -> bool:
    """True iff a pin names this certificate: a hex pin its sha256, an ``spki:`` pin its
    SPKI hash. Every pin is compared (constant time, no early exit); no pins → False."""
    matched = False
    for pin in pins:
        got = spki if pin.startswith(SPKI_PREFIX) else cert_sha256
        if got is not None:
            matched |= hmac.compare_digest(got.encode(), pin.encode())
    return matched


def normalize_pin(pin: str) -> str:
    """Lowercase hex; ``openssl x509 -fingerprint -sha256`` style (``AB:CD:…``) accepted.
    An ``spki:`` pin is only stripped of surrounding blanks (base64 is case-sensitive)."""
    if pin.strip().startswith(SPKI_PREFIX):
        return pin.strip()
    return pin.replace(":", "").strip().lower()


def server_cert_sha256_matches(ssl_object: Any, pins: Iterable[str]) -> bool:
    """True iff the peer's leaf certificate matches one of ``pins`` (certificate sha256 or
    ``spki:`` pin); no certificate or no pins: False (fail closed). Constant time."""
    cert_sha256, spki = peer_cert_pins(ssl_object)
    if cert_sha256 is None:
        return False
    return pin_matches([normalize_pin(p) for p in pins], cert_sha256, spki)
