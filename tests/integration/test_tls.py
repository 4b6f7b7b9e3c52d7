"""common.tls over real loopback sockets with real certificates from ``init_pki``.

PROTOCOL.md §2 / §4 step 0: TLS 1.3 only, a client certificate chaining to the client CA
is required, and a refusal is a failed handshake, never an HTTP answer. With TLS 1.3 the
client finishes its side of the handshake before the server has judged its certificate,
so the refusal only shows up when the client reads: every negative case therefore sends
a real request and asserts that no HTTP response came back and the handler never ran.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from common.tls import (
    TlsConfigError,
    client_context,
    peer_cert_sha256,
    server_cert_sha256_matches,
    server_context,
)
from fedgate.pki import PkiResult, init_pki

IDS = ["spectrastrike-producer", "second-producer"]
TIMEOUT = aiohttp.ClientTimeout(total=10)
# What a refused handshake may look like on the client, depending on when it is noticed.
REFUSED = (aiohttp.ClientError, ssl.SSLError, ConnectionResetError)


@dataclass
class Gateway:
    url: str
    port: int
    calls: list[str | None] = field(default_factory=list)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiResult:
    return init_pki(tmp_path_factory.mktemp("pki"), IDS)


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> PkiResult:
    """An unrelated CA issuing certificates for the very same identity names."""
    return init_pki(tmp_path_factory.mktemp("rogue"), IDS)


@pytest.fixture
async def gateway(pki: PkiResult) -> AsyncIterator[Gateway]:
    state = Gateway(url="", port=0)

    async def whoami(request: web.Request) -> web.Response:
        fp = peer_cert_sha256(request.transport.get_extra_info("ssl_object"))
        state.calls.append(fp)
        return web.Response(text=fp or "none")

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = server_context(pki.gateway.cert, pki.gateway.key, pki.ca.cert)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)  # 0: a free port
    await site.start()
    state.port = runner.addresses[0][1]
    state.url = f"https://127.0.0.1:{state.port}/whoami"
    try:
        yield state
    finally:
        await runner.cleanup()


async def get(url: str, ctx: ssl.SSLContext) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.get(url, ssl=ctx) as resp:
        return resp.status, await resp.text()


def client(pki: PkiResult, name: str) -> ssl.SSLContext:
    issued = pki.identities[name]
    return client_context(pki.ca.cert, issued.cert, issued.key)


async def assert_refused(gw: Gateway, ctx: ssl.SSLContext) -> BaseException:
    with pytest.raises(REFUSED) as info:
        await get(gw.url, ctx)  # a real request: TLS 1.3 refusals surface on the read
    assert gw.calls == [], "the handler ran: the request got past TLS"
    return info.value


async def test_valid_client_cert_gets_its_pin(gateway: Gateway, pki: PkiResult) -> None:
    status, body = await get(gateway.url, client(pki, IDS[0]))
    assert status == 200
    assert body == pki.pins["identities"][IDS[0]]
    assert gateway.calls == [body]


async def test_each_identity_gets_its_own_pin(gateway: Gateway, pki: PkiResult) -> None:
    bodies = [(await get(gateway.url, client(pki, name)))[1] for name in IDS]
    assert bodies == [pki.pins["identities"][name] for name in IDS]
    assert len(set(bodies)) == len(IDS)


async def test_no_client_cert_is_refused(gateway: Gateway, pki: PkiResult) -> None:
    await assert_refused(gateway, client_context(pki.ca.cert))


@pytest.mark.parametrize("cert", [None, "rogue"])
async def test_tls13_refusal_shows_only_on_read(gateway: Gateway, pki: PkiResult,
                                                rogue: PkiResult, cert: str | None) -> None:
    # The client's handshake "succeeds"; the server then drops the connection (asyncio
    # closes it without flushing the alert), so the first read sees EOF, never HTTP.
    issued = rogue.identities[IDS[0]] if cert else None
    ctx = client_context(pki.ca.cert, issued and issued.cert, issued and issued.key)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, ssl=ctx)
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        data = await asyncio.wait_for(reader.read(64), 10)
    except (ssl.SSLError, ConnectionResetError):
        data = b""
    finally:
        writer.close()
    assert data == b"", data
    assert gateway.calls == []


async def test_client_cert_from_another_ca_is_refused(gateway: Gateway, pki: PkiResult,
                                                      rogue: PkiResult) -> None:
    issued = rogue.identities[IDS[0]]  # same CN and SAN, wrong issuer
    await assert_refused(gateway, client_context(pki.ca.cert, issued.cert, issued.key))


async def test_server_cert_as_client_cert_is_refused(gateway: Gateway, pki: PkiResult) -> None:
    # Chains to the right CA but carries serverAuth only: not a client certificate.
    await assert_refused(gateway, client_context(pki.ca.cert, pki.gateway.cert, pki.gateway.key))


async def test_tls12_client_is_refused(gateway: Gateway, pki: PkiResult) -> None:
    ctx = client(pki, IDS[0])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    await assert_refused(gateway, ctx)


async def test_client_rejects_server_from_wrong_ca(gateway: Gateway, pki: PkiResult,
                                                   rogue: PkiResult) -> None:
    issued = pki.identities[IDS[0]]
    ctx = client_context(rogue.ca.cert, issued.cert, issued.key)
    exc = await assert_refused(gateway, ctx)
    assert isinstance(exc, aiohttp.ClientConnectorCertificateError)


async def test_client_checks_the_hostname(gateway: Gateway, pki: PkiResult) -> None:
    # The server cert names localhost and 127.0.0.1 only.
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await asyncio.open_connection("127.0.0.1", gateway.port, ssl=client(pki, IDS[0]),
                                      server_hostname="gateway.example")


async def test_emitter_server_pinning(gateway: Gateway, pki: PkiResult) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port,
                                                   ssl=client(pki, IDS[0]))
    try:
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj.version() == "TLSv1.3"
        assert peer_cert_sha256(sslobj) == pki.pins["gateway_sha256"]
        gw_pin = pki.pins["gateway_sha256"]
        assert server_cert_sha256_matches(sslobj, {gw_pin})
        assert server_cert_sha256_matches(sslobj, {"0" * 64, gw_pin.upper()})  # rotation
        assert not server_cert_sha256_matches(sslobj, {pki.pins["ca_sha256"]})
        assert not server_cert_sha256_matches(sslobj, set())  # no pins: fail closed
    finally:
        writer.close()
        await writer.wait_closed()
    assert peer_cert_sha256(None) is None


class ServerPins(aiohttp.Fingerprint):
    """aiohttp runs ``check`` right after the handshake, before writing the request."""

    def __init__(self, pins: set[str]) -> None:
        super().__init__(bytes(32))
        self.pins = pins

    def check(self, transport: asyncio.Transport) -> None:
        if not server_cert_sha256_matches(transport.get_extra_info("ssl_object"), self.pins):
            raise aiohttp.ServerFingerprintMismatch(b"", b"", "pinned gateway", 0)


@pytest.mark.parametrize(("pin", "ok"), [("gateway_sha256", True), ("ca_sha256", False)])
async def test_server_pin_checked_before_the_request(gateway: Gateway, pki: PkiResult,
                                                     pin: str, ok: bool) -> None:
    connector = aiohttp.TCPConnector(ssl=ServerPins({pki.pins[pin]}))
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        if ok:
            async with session.get(gateway.url, ssl=client(pki, IDS[0])) as resp:
                assert resp.status == 200
            assert gateway.calls == [pki.pins["identities"][IDS[0]]]
        else:
            with pytest.raises(aiohttp.ServerFingerprintMismatch):
                await session.get(gateway.url, ssl=client(pki, IDS[0]))
            assert gateway.calls == []  # nothing was sent to the unpinned server


def test_unusable_files_name_the_file(pki: PkiResult, rogue: PkiResult, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsConfigError, match="missing.pem"):
        server_context(pki.gateway.cert, pki.gateway.key, missing)
    with pytest.raises(TlsConfigError, match="does not match"):
        server_context(pki.gateway.cert, rogue.gateway.key, pki.ca.cert)
    with pytest.raises(TlsConfigError, match=str(pki.gateway.key)):
        server_context(pki.gateway.key, pki.gateway.key, pki.ca.cert)
    with pytest.raises(TlsConfigError, match="gateway.crt: no PEM private key"):
        client_context(pki.ca.cert, pki.gateway.cert, pki.gateway.cert)


def test_contexts_are_tls13_only(pki: PkiResult) -> None:
    srv = server_context(pki.gateway.cert, pki.gateway.key, pki.ca.cert)
    assert srv.minimum_version == ssl.TLSVersion.TLSv1_3
    assert srv.verify_mode == ssl.CERT_REQUIRED
    assert srv.options & ssl.OP_NO_COMPRESSION and srv.num_tickets == 0
    cli = client_context(pki.ca.cert)
    assert cli.minimum_version == ssl.TLSVersion.TLSv1_3
    assert cli.check_hostname and cli.verify_mode == ssl.CERT_REQUIRED
