"""Development PKI for ``fedgate certs init`` (PROTOCOL.md §2, §8).

One directory holds a self-signed CA, the gateway's server certificate, one client
certificate per service identity, and ``pins.json``: the sha256 of each certificate's DER
(lowercase hex), which is exactly what the gateway pins per identity and what the emitter
pins for the server, and [v1.1] the same certificates' SPKI pins
(``spki:<base64 sha256 of the SubjectPublicKeyInfo DER>``, which survive a renewal with
the same key): ``gateway_spki`` and ``identities_spki``. EC P-256 keys, ECDSA-SHA256
signatures, PKCS#8 PEM private keys written 0600 in a 0700 directory. Nothing is ever
overwritten unless ``force=True``.

These are DEVELOPMENT certificates: the CA key sits next to the certificates, unencrypted.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.tls import spki_pin

IDENTITY_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_RESERVED = {"ca", "gateway", "pins"}  # file stems init_pki itself uses
CA_CN = "fedgate dev CA"
GATEWAY_CN = "fedgate gateway"
URI_PREFIX = "urn:fedgate:identity:"
BACKDATE = timedelta(minutes=5)  # tolerate small clock differences between hosts


class PkiError(ValueError):
    """A refused or impossible PKI operation; the message is one line."""


@dataclass(frozen=True)
class IssuedCert:
    name: str
    cert: Path
    key: Path
    sha256: str  # sha256 of the certificate's DER, lowercase hex
    spki: str = ""  # "spki:<base64 sha256 of its SubjectPublicKeyInfo DER>"


@dataclass(frozen=True)
class PkiResult:
    out_dir: Path
    ca: IssuedCert
    gateway: IssuedCert
    identities: dict[str, IssuedCert]
    pins_path: Path
    pins: dict[str, Any] = field(default_factory=dict)


def cert_sha256(pem_or_der: bytes) -> str:
    """sha256 (lowercase hex) of a certificate's DER; a PEM input uses its first certificate."""
    try:
        if pem_or_der.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(pem_or_der)
        else:
            cert = x509.load_der_x509_certificate(pem_or_der)
    except ValueError as exc:
        raise PkiError(f"not an X.509 certificate: {exc}") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def check_identity(name: str) -> str:
    if not isinstance(name, str) or not IDENTITY_RE.fullmatch(name):
        raise PkiError(f"invalid identity name {name!r} (must match {IDENTITY_RE.pattern})")
    if name.casefold() in _RESERVED:
        raise PkiError(f"identity name {name!r} is reserved (ca, gateway, pins)")
    return name


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_RE.fullmatch(host):
        raise PkiError(f"invalid host {host!r}: not an IP address or DNS name")
    return x509.DNSName(host)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """CA: keyCertSign + cRLSign; leaf: digitalSignature (ECDHE-ECDSA needs nothing more)."""
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False)


def _make_ca(now: datetime, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_CN)).issuer_name(_name(CA_CN))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str,
               sans: list[x509.GeneralName], eku: x509.ObjectIdentifier, now: datetime,
               days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise PkiError(f"the CA expired at {ca_cert.not_valid_after_utc.isoformat()}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _client_leaf(ca_cert, ca_key, name: str, now: datetime, days: int):
    return _make_leaf(ca_cert, ca_key, name, [x509.UniformResourceIdentifier(URI_PREFIX + name)],
                      ExtendedKeyUsageOID.CLIENT_AUTH, now, days)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _der_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _issued(name: str, cert_path: Path, key_path: Path, cert: x509.Certificate) -> IssuedCert:
    return IssuedCert(name, cert_path, key_path, _der_sha256(cert),
                      spki_pin(cert.public_bytes(serialization.Encoding.DER)))


def write_file(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode``; never follow a symlink; replace only with ``force``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp") if force else path
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise PkiError(f"refusing to overwrite {path} (use force)") from None
    try:
        os.fchmod(fd, mode)  # independent of the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(target, path)
    except BaseException:
        if force:
            target.unlink(missing_ok=True)
        raise


def _refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        raise PkiError(f"refusing to overwrite {', '.join(existing)} (use force)")


def _pins_bytes(pins: dict[str, Any]) -> bytes:
    return (json.dumps(pins, indent=2, sort_keys=True) + "\n").encode()


def _prepare_dir(out_dir: Path) -> None:
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)


def init_pki(out_dir: Path, identities: list[str], *,
             hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 30,
             now: datetime | None = None, force: bool = False) -> PkiResult:
    """Create the CA, the gateway cert, one client cert per identity and pins.json."""
    out_dir = Path(out_dir)
    names = [check_identity(n) for n in identities]
    if len({n.casefold() for n in names}) != len(names):
        raise PkiError("duplicate identity names")
    if days < 1:
        raise PkiError(f"days must be >= 1, got {days}")
    if not hosts:
        raise PkiError("at least one host is needed for the gateway certificate")
    sans = [_san_entry(h) for h in hosts]
    stems = ["ca", "gateway", *names]
    files = [out_dir / f"{s}{ext}" for s in stems for ext in (".crt", ".key")]
    pins_path = out_dir / "pins.json"
    if not force:
        _refuse_existing([*files, pins_path])
    _prepare_dir(out_dir)
    t = _now(now)

    ca_cert, ca_key = _make_ca(t, days)
    issued: dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {
        "ca": (ca_cert, ca_key),
        "gateway": _make_leaf(ca_cert, ca_key, GATEWAY_CN, sans,
                              ExtendedKeyUsageOID.SERVER_AUTH, t, days),
    }
    for n in names:
        issued[n] = _client_leaf(ca_cert, ca_key, n, t, days)

    out: dict[str, IssuedCert] = {}
    for stem, (cert, key) in issued.items():
        key_path, cert_path = out_dir / f"{stem}.key", out_dir / f"{stem}.crt"
        write_file(key_path, _key_pem(key), 0o600, force)
        write_file(cert_path, _cert_pem(cert), 0o644, force)
        out[stem] = _issued(stem, cert_path, key_path, cert)
    pins = {
        "ca_sha256": out["ca"].sha256,
        "gateway_sha256": out["gateway"].sha256,
        "identities": {n: out[n].sha256 for n in names},
        "gateway_spki": out["gateway"].spki,
        "identities_spki": {n: out[n].spki for n in names},
    }
    write_file(pins_path, _pins_bytes(pins), 0o644, force)
    return PkiResult(out_dir, out["ca"], out["gateway"], {n: out[n] for n in names},
                     pins_path, pins)


def issue_client_cert(ca_dir: Path, name: str, *, out_dir: Path | None = None,
                      days: int = 30, now: datetime | None = None,
                      force: bool = False) -> IssuedCert:
    """Issue ``<name>.crt``/``<name>.key`` from the CA in ``ca_dir``; record its pin in
    ``ca_dir/pins.json`` when that file exists."""
    ca_dir = Path(ca_dir)
    out_dir = Path(out_dir) if out_dir is not None else ca_dir
    check_identity(name)
    if days < 1:
        raise PkiError(f"days must be >= 1, got {days}")
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot load the CA from {ca_dir}: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{ca_dir / 'ca.key'} is not an EC private key")
    pins_path = ca_dir / "pins.json"
    pins: dict[str, Any] | None = None
    if pins_path.exists():
        try:
            pins = json.loads(pins_path.read_text(encoding="utf-8"))
            known = pins["identities"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PkiError(f"{pins_path}: malformed pins file ({exc})") from None
        if name in known and not force:
            raise PkiError(f"identity {name!r} already pinned in {pins_path} (use force)")
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    if not force:
        _refuse_existing([cert_path, key_path])
    _prepare_dir(out_dir)
    cert, key = _client_leaf(ca_cert, ca_key, name, _now(now), days)
    write_file(key_path, _key_pem(key), 0o600, force)
    write_file(cert_path, _cert_pem(cert), 0o644, force)
    result = _issued(name, cert_path, key_path, cert)
    if pins is not None:
        pins["identities"][name] = result.sha256
        if isinstance(pins.get("identities_spki"), dict):  # absent in pre-v1.1 files
            pins["identities_spki"][name] = result.spki
        write_file(pins_path, _pins_bytes(pins), 0o644, force=True)  # atomic replace
    return result
