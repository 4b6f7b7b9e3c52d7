"""SPKI pins (PROTOCOL.md §2 v1.1): extraction from certificate DER, pin syntax in the
gateway config and the emitter's server_pins."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from common.tls import is_pin, normalize_pin, pin_matches, spki_der, spki_pin
from common.tomlfile import ConfigError
from gateway.config.config import SecurityConfig

TENANT = "7758e414-233a-5ea0-575b-cf0c26f5259a"
GOOD = "spki:" + base64.b64encode(hashlib.sha256(b"k").digest()).decode()


def _cert(key, *, version_v1: bool = False) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + timedelta(days=1)))
    if not version_v1:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                        critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("make", [
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ed25519.Ed25519PrivateKey.generate,
], ids=["p256", "p384", "rsa2048", "ed25519"])
def test_spki_der_is_the_certificates_subject_public_key_info(make) -> None:
    key = make()
    expected = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    der = _cert(key)
    assert spki_der(der) == expected
    pin = spki_pin(der)
    assert pin == "spki:" + base64.b64encode(hashlib.sha256(expected).digest()).decode()
    assert is_pin(pin)


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x30\x82\xff\xff", b"\x02\x01\x00"])
def test_spki_der_refuses_what_is_not_a_certificate(der: bytes) -> None:
    with pytest.raises(ValueError):
        spki_der(der)


@pytest.mark.parametrize(("pin", "ok"), [
    ("ab" * 32, True), (GOOD, True),
    ("AB" * 32, False),  # the gateway config wants lowercase hex
    (GOOD[:-1], False), (GOOD + "=", False), (GOOD.replace("spki:", "SPKI:"), False),
    ("spki:" + base64.urlsafe_b64encode(b"\xfb" * 32).decode(), False),  # url-safe alphabet
    ("spki:" + base64.b64encode(b"\0" * 31).decode(), False),  # 31 bytes
    ("spki:" + base64.b64encode(b"\0" * 32).decode()[:-2] + "B=", False),  # non-canonical
    ("sha256:" + "ab" * 32, False), ("spki:" + "ab" * 32, False),
])
def test_gateway_pin_syntax(pin: str, ok: bool) -> None:
    raw = {"identities": {"p": {"pins": [pin], "tenants": [TENANT]}}}
    if ok:
        assert SecurityConfig.from_mapping(raw).identities["p"].pins == {pin}
    else:
        with pytest.raises(ConfigError, match="identities.p.pins"):
            SecurityConfig.from_mapping(raw)


def test_one_spki_pin_cannot_belong_to_two_identities() -> None:
    raw = {"identities": {"a": {"pins": [GOOD], "tenants": []},
                          "b": {"pins": ["ab" * 32, GOOD], "tenants": []}}}
    with pytest.raises(ConfigError, match="also pinned to identity 'a'"):
        SecurityConfig.from_mapping(raw)


def test_pin_matches_each_form_against_its_own_hash() -> None:
    cert_hex = "ab" * 32
    assert pin_matches([GOOD], cert_hex, GOOD)
    assert pin_matches(["00" * 32, cert_hex], cert_hex, None)
    assert not pin_matches([GOOD], cert_hex, None)  # no SPKI known: fail closed
    assert not pin_matches([GOOD], GOOD, "spki:other")  # a hex hash never meets spki:
    assert not pin_matches([cert_hex], "cd" * 32, cert_hex)
    assert not pin_matches([], cert_hex, GOOD)


def test_emitter_normalizes_hex_pins_only() -> None:
    assert normalize_pin(" AB:" + "CD" * 31 + " ") == "ab" + "cd" * 31
    assert normalize_pin(f" {GOOD} ") == GOOD  # base64 is case-sensitive: left as is


@pytest.mark.parametrize("der", [
    b"", b"\x30", b"\x30\x00", b"\x30\x02\x30\x00", b"\x30\x03\x30\x01\xa0",
    b"\x30\x04\x30\x02\x02\x00", b"\x30\x82\x01", b"\x30\x05\x30\x03\xa0\x05\x00",
], ids=lambda d: d.hex() or "empty")
def test_spki_der_raises_value_error_on_any_truncation(der: bytes) -> None:
    with pytest.raises(ValueError):
        spki_der(der)


def test_spki_der_raises_value_error_on_every_prefix_of_a_certificate() -> None:
    der = _cert(ec.generate_private_key(ec.SECP256R1()))
    for n in range(len(der)):
        with pytest.raises(ValueError):
            spki_der(der[:n])
