"""fedgate.pki: the dev PKI behind ``fedgate certs init`` (PROTOCOL.md §2, §8)."""

from __future__ import annotations

import ipaddress
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedgate.pki import PkiError, PkiResult, cert_sha256, init_pki, issue_client_cert

IDS = ["spectrastrike-producer", "other.producer_2"]
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiResult:
    return init_pki(tmp_path_factory.mktemp("pki") / "certs", IDS)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_every_file(pki: PkiResult) -> None:
    expected = {"ca.crt", "ca.key", "gateway.crt", "gateway.key", "pins.json"}
    expected |= {f"{n}{ext}" for n in IDS for ext in (".crt", ".key")}
    assert {p.name for p in pki.out_dir.iterdir()} == expected
    assert mode(pki.out_dir) == 0o700
    assert pki.identities[IDS[0]].cert == pki.out_dir / f"{IDS[0]}.crt"


def test_private_keys_are_0600_and_unencrypted_p256(pki: PkiResult) -> None:
    keys = [pki.ca.key, pki.gateway.key, *(c.key for c in pki.identities.values())]
    for path in keys:
        assert mode(path) == 0o600, path
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        assert key.curve.name == "secp256r1"
    assert mode(pki.gateway.cert) == 0o644


def test_pins_equal_cert_sha256_of_the_files(pki: PkiResult) -> None:
    on_disk = json.loads(pki.pins_path.read_text())
    assert on_disk == pki.pins
    assert on_disk["ca_sha256"] == cert_sha256(pki.ca.cert.read_bytes())
    assert on_disk["gateway_sha256"] == cert_sha256(pki.gateway.cert.read_bytes())
    assert set(on_disk["identities"]) == set(IDS)
    for name, pin in on_disk["identities"].items():
        pem = (pki.out_dir / f"{name}.crt").read_bytes()
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        assert pin == cert_sha256(pem) == cert_sha256(der)
        assert len(pin) == 64 and pin == pin.lower()
    assert len(set(on_disk["identities"].values())) == len(IDS)


def test_cert_sha256_rejects_garbage() -> None:
    with pytest.raises(PkiError):
        cert_sha256(b"not a certificate")


def test_ca_is_a_constrained_ca(pki: PkiResult) -> None:
    ca = load(pki.ca.cert)
    assert ca.subject.rfc4514_string() == "CN=fedgate dev CA" and ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.verify_directly_issued_by(ca)


def test_gateway_cert_has_sans_and_server_auth(pki: PkiResult) -> None:
    gw = load(pki.gateway.cert)
    san = gw.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = gw.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert gw.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not gw.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_ski = load(pki.ca.cert).extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = gw.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.value.digest
    gw.verify_directly_issued_by(load(pki.ca.cert))


def test_client_certs_chain_to_the_ca(pki: PkiResult, tmp_path: Path) -> None:
    ca = load(pki.ca.cert)
    for name in IDS:
        cert = load(pki.out_dir / f"{name}.crt")
        assert cert.subject.rfc4514_string() == f"CN={name}"
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == [f"urn:fedgate:identity:{name}"]
        cert.verify_directly_issued_by(ca)
    other = init_pki(tmp_path / "other", IDS[:1])  # an unrelated CA with the same CN
    with pytest.raises(InvalidSignature):
        load(other.identities[IDS[0]].cert).verify_directly_issued_by(ca)


def test_validity_follows_now_and_days(tmp_path: Path) -> None:
    r = init_pki(tmp_path / "p", ["a"], days=3, now=NOW)
    cert = load(r.identities["a"].cert)
    assert cert.not_valid_before_utc <= NOW < cert.not_valid_after_utc
    assert cert.not_valid_after_utc == NOW + timedelta(days=3)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "p"
    first = init_pki(out, ["a"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PkiError, match="refusing to overwrite"):
        init_pki(out, ["a"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    lone = tmp_path / "q"
    lone.mkdir()
    (lone / "b.key").write_text("operator's file")  # one existing output file is enough
    with pytest.raises(PkiError, match="b.key"):
        init_pki(lone, ["b"])
    assert [p.name for p in lone.iterdir()] == ["b.key"]
    assert (lone / "b.key").read_text() == "operator's file"
    again = init_pki(out, ["a", "b"], force=True)
    assert again.pins["ca_sha256"] != first.pins["ca_sha256"]
    assert mode(again.identities["b"].key) == 0o600
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["", "a b", "../x", "a/b", "é", "x" * 129, "ca", "Gateway"])
def test_refuses_a_bad_identity_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(PkiError):
        init_pki(tmp_path / "p", [name])
    assert not (tmp_path / "p").exists()


def test_refuses_bad_hosts_and_days(tmp_path: Path) -> None:
    with pytest.raises(PkiError):
        init_pki(tmp_path / "p", ["a"], hosts=["bad host"])
    with pytest.raises(PkiError):
        init_pki(tmp_path / "p", ["a"], days=0)
    with pytest.raises(PkiError):
        init_pki(tmp_path / "p", ["a", "a"])


def test_issue_client_cert_later(tmp_path: Path) -> None:
    r = init_pki(tmp_path / "p", ["a"], days=10, now=NOW)
    issued = issue_client_cert(r.out_dir, "late", days=100, now=NOW + timedelta(days=1))
    cert = load(issued.cert)
    cert.verify_directly_issued_by(load(r.ca.cert))
    assert mode(issued.key) == 0o600
    assert cert.not_valid_after_utc == load(r.ca.cert).not_valid_after_utc  # clamped to CA
    pins = json.loads(r.pins_path.read_text())
    assert pins["identities"] == {"a": r.pins["identities"]["a"], "late": issued.sha256}
    assert issued.sha256 == cert_sha256(issued.cert.read_bytes())
    with pytest.raises(PkiError, match="already pinned"):
        issue_client_cert(r.out_dir, "late")
    with pytest.raises(PkiError):
        issue_client_cert(r.out_dir, "no good")
    with pytest.raises(PkiError, match="cannot load the CA"):
        issue_client_cert(tmp_path / "missing", "x")
