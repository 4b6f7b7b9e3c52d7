"""SPKI pins (PROTOCOL.md §2 v1.1) over real mTLS: the gateway's identity pins and the
emitter's server pins, with certificates renewed on the same key and re-keyed ones.

Every certificate is real (the project's dev PKI, renewed here with ``cryptography``
the way an operator's CA would: same subject and extensions, new serial and validity,
same or a new key); every request crosses a loopback TLS 1.3 socket.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from lab import IDENTITY, NOW, PRODUCER, Lab, body_for
from pins import openssl_spki_pin
from stack import FEEDBACK_SEED, Stack, toml_value

from common.tls import client_context, spki_pin
from emitter.client import EmitterClient
from emitter.settings import load_emitter_settings
from fedgate.cli import main as gateway_main
from keyring import Key, Keyring, PrivateKey
from keyring.keys import save_jwks
from schemas.routes import TELEMETRY_PATH

LAB = Lab(None)


def renew(stack: Stack, stem: str, out: Path, *, same_key: bool = True) -> tuple[Path, Path]:
    """Re-issue ``stem``'s certificate from the stack's CA: same subject and extensions,
    a new serial and validity; its key (``same_key``) or a fresh one. → (cert, key)."""
    certs = stack.pki.out_dir
    old = x509.load_pem_x509_certificate((certs / f"{stem}.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    key_pem = (certs / f"{stem}.key").read_bytes()
    key = (serialization.load_pem_private_key(key_pem, None) if same_key
           else ec.generate_private_key(ec.SECP256R1()))
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=1))
               .not_valid_after(now + timedelta(days=90)))
    for ext in old.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectKeyIdentifier):
            value = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = builder.add_extension(value, ext.critical)
    cert = builder.sign(ca_key, hashes.SHA256())
    assert cert.serial_number != old.serial_number
    assert cert.not_valid_after_utc != old.not_valid_after_utc
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def der(cert: Path) -> bytes:
    return x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)


def pin_identity(stack: Stack, *pins: str) -> None:
    """Replace the producer identity's pins in the gateway config."""
    text = stack.config_path.read_text()
    old = f"pins = [{toml_value(stack.pin())}]"
    assert text.count(old) == 1
    stack.config_path.write_text(text.replace(old, f"pins = {toml_value(list(pins))}"))


async def send(stack: Stack, cert: Path, key: Path, **extra_headers: str) -> tuple[int, dict]:
    """One signed telemetry request over a TLS session presenting ``cert``."""
    headers, body = LAB.signed()
    ctx = client_context(stack.pki.ca.cert, cert, key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as client, \
            client.post(stack.url + TELEMETRY_PATH, data=body,
                        headers={**headers, **extra_headers}) as resp:
        return resp.status, await resp.json()


def audit_hashes(stack: Stack) -> list[str]:
    return [json.loads(line)["tls.client.hash.sha256"]
            for line in stack.audit_path.read_text().splitlines()]


@pytest.fixture
def stack(tmp_path, sqlite_url):
    return Stack(tmp_path, sqlite_url)


# -- the gateway's identity pins ----------------------------------------------------------

async def test_renewed_client_cert_same_key_passes_an_spki_pin(stack, tmp_path):
    me = stack.pki.identities[IDENTITY]
    renewed, renewed_key = renew(stack, IDENTITY, tmp_path / "renewed")
    assert spki_pin(der(renewed)) == me.spki  # same key, same SPKI pin ...
    assert hashlib.sha256(der(renewed)).hexdigest() != me.sha256  # ... another certificate
    pin_identity(stack, me.spki)
    async with stack.running(clock=lambda: NOW):
        assert (await send(stack, me.cert, me.key))[0] == 202
        status, payload = await send(stack, renewed, renewed_key)
    assert status == 202, payload
    assert audit_hashes(stack) == [me.sha256, hashlib.sha256(der(renewed)).hexdigest()]


async def test_renewed_client_cert_is_refused_by_the_old_cert_hash_pin(stack, tmp_path):
    me = stack.pki.identities[IDENTITY]
    renewed, renewed_key = renew(stack, IDENTITY, tmp_path / "renewed")
    async with stack.running(clock=lambda: NOW):  # the config pins the certificate hash
        assert (await send(stack, me.cert, me.key))[0] == 202
        status, payload = await send(stack, renewed, renewed_key)
    assert (status, payload["error"]) == (401, "identity_rejected")


async def test_another_key_is_refused_by_an_spki_pin(stack, tmp_path):
    """A certificate from the same CA, same subject, but a new key: its SPKI differs."""
    me = stack.pki.identities[IDENTITY]
    rekeyed, rekeyed_key = renew(stack, IDENTITY, tmp_path / "rekeyed", same_key=False)
    assert spki_pin(der(rekeyed)) != me.spki
    other = stack.pki.identities["spectrastrike-other"]
    pin_identity(stack, me.spki)
    async with stack.running(clock=lambda: NOW):
        for cert, key in ((rekeyed, rekeyed_key), (other.cert, other.key)):
            status, payload = await send(stack, cert, key)
            assert (status, payload["error"]) == (401, "identity_rejected")
        assert (await send(stack, me.cert, me.key))[0] == 202


async def test_spki_and_cert_pins_side_by_side_for_a_key_rotation(stack, tmp_path):
    """Rotation: the old certificate's hash pin and the new key's SPKI pin together."""
    me = stack.pki.identities[IDENTITY]
    rekeyed, rekeyed_key = renew(stack, IDENTITY, tmp_path / "rekeyed", same_key=False)
    pin_identity(stack, me.sha256, spki_pin(der(rekeyed)))
    async with stack.running(clock=lambda: NOW):
        assert (await send(stack, me.cert, me.key))[0] == 202
        assert (await send(stack, rekeyed, rekeyed_key))[0] == 202


async def test_legacy_cert_header_is_still_the_cert_hash_under_an_spki_pin(stack, tmp_path):
    me = stack.pki.identities[IDENTITY]
    renewed, renewed_key = renew(stack, IDENTITY, tmp_path / "renewed")
    renewed_sha = hashlib.sha256(der(renewed)).hexdigest()
    pin_identity(stack, me.spki)
    async with stack.running(clock=lambda: NOW):
        ok = await send(stack, renewed, renewed_key, **{"X-Client-Cert-Sha256": renewed_sha})
        assert ok[0] == 202, ok
        for claimed in (me.sha256, me.spki):  # the old cert's hash, or the pin itself
            status, payload = await send(stack, renewed, renewed_key,
                                         **{"X-Client-Cert-Sha256": claimed})
            assert (status, payload["error"]) == (401, "identity_rejected")


# -- the emitter's server pins -------------------------------------------------------------

def emitter_config(stack: Stack, pins: list[str], name: str) -> Path:
    root = stack.root / "emitter"
    root.mkdir(exist_ok=True)
    (root / "producer.pem").write_bytes(PRODUCER.to_pem())
    save_jwks(root / "feedback.jwks.json",
              Keyring([Key("vv-fb-2026", PrivateKey(FEEDBACK_SEED).public)]))
    me = stack.pki.identities[IDENTITY]
    values = {"url": stack.url, "ca": str(stack.pki.ca.cert), "cert": str(me.cert),
              "key": str(me.key), "server_pins": pins, "identity": IDENTITY,
              "signing_key": "producer.pem", "kid": "lab-2026",
              "feedback_keyring": "feedback.jwks.json", "state_dir": f"state-{name}",
              "max_attempts": 1, "request_timeout_s": 5}
    path = root / f"{name}.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


async def emit(cfg: Path) -> tuple[str, str | None]:
    body = body_for(TELEMETRY_PATH)
    body["payload"]["event_id"] = str(uuid.uuid4())
    async with EmitterClient(load_emitter_settings(cfg)) as client:
        result = await client.send_telemetry(body)
    return result.outcome, result.error


async def test_emitter_spki_server_pin_survives_a_gateway_cert_renewal(stack, tmp_path):
    gw = stack.pki.gateway
    by_spki = emitter_config(stack, [gw.spki], "spki")
    by_cert = emitter_config(stack, [gw.sha256], "cert")
    wrong = emitter_config(stack, [stack.pki.ca.spki], "wrong")  # a key, not the gateway's
    async with stack.running():
        assert await emit(by_spki) == ("accepted", None)
        assert await emit(by_cert) == ("accepted", None)
        assert await emit(wrong) == ("refused", "server_pin_mismatch")
    # the gateway's certificate is renewed on the same key: only the SPKI pin still holds
    renewed, renewed_key = renew(stack, "gateway", tmp_path / "gw")
    text = stack.config_path.read_text()
    stack.config_path.write_text(
        text.replace('tls_cert = "certs/gateway.crt"', f"tls_cert = {toml_value(str(renewed))}")
        .replace('tls_key = "certs/gateway.key"', f"tls_key = {toml_value(str(renewed_key))}"))
    async with stack.running():
        assert await emit(by_spki) == ("accepted", None)
        assert await emit(by_cert) == ("refused", "server_pin_mismatch")
        assert await emit(wrong) == ("refused", "server_pin_mismatch")


# -- fedgate certs init --------------------------------------------------------------------



def test_certs_init_prints_and_writes_spki_pins(tmp_path, capsys):
    out = tmp_path / "pki"
    assert gateway_main(["certs", "init", str(out), "--identity", "a", "--identity", "b"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "pins.json").read_text())
    assert printed["gateway_spki"] == openssl_spki_pin(out / "gateway.crt")
    assert printed["identities_spki"] == {n: openssl_spki_pin(out / f"{n}.crt")
                                          for n in ("a", "b")}
    assert len(set(printed["identities_spki"].values())) == 2


async def test_one_certificate_pinned_to_two_identities_speaks_as_neither(stack, caplog):
    """The configuration check compares pin strings: the producer pinned by its
    certificate's sha256 and ``spectrastrike-other`` by the same certificate's SPKI pin
    both passed it, and that one certificate could speak as either identity. The
    gateway refuses it for both (401), logs and audits why; other certificates pass."""
    me = stack.pki.identities[IDENTITY]
    other = stack.pki.identities["spectrastrike-other"]
    text = stack.config_path.read_text()
    old = f"pins = [{toml_value(other.sha256)}]"
    assert text.count(old) == 1
    stack.config_path.write_text(text.replace(old, f"pins = {toml_value([other.sha256, me.spki])}"))
    async with stack.running(clock=lambda: NOW):
        for claimed in (IDENTITY, "spectrastrike-other"):
            status, payload = await send(stack, me.cert, me.key,
                                         **{"X-Service-Identity": claimed})
            assert (status, payload["error"]) == (401, "identity_rejected"), claimed
        # the other identity's own certificate is pinned to it alone: it passes §4.3
        # (its request then fails later: LAB signs as the producer)
        status, payload = await send(stack, other.cert, other.key,
                                     **{"X-Service-Identity": "spectrastrike-other"})
        assert payload["error"] != "identity_rejected"
    assert "pinned to several identities" in caplog.text
    events = [json.loads(line) for line in stack.audit_path.read_text().splitlines()]
    assert [(e["event.reason"], e["tls.client.hash.sha256"]) for e in events[:2]] == [
        ("identity_rejected", me.sha256)] * 2
    assert all("pinned to more than one identity" in e["message"] for e in events[:2])
