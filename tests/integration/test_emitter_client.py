"""The emitter against a real gateway: real mTLS, real files, real store.

In-process gateways (``Stack.start``) when a test controls time; ``fedgate serve``
subprocesses (``Stack.spawn``) for outages and restarts on the wall clock; emitter
child processes SIGKILLed at a chosen point for crashes. Fakes are used only where the
real gateway cannot misbehave on purpose: a redirecting server, a 503 server, a forged
feedback server, a TCP proxy that loses a 202 on its way back, hostile answers (deep
nesting, huge numbers, 10 MiB bodies), a server that holds its answer (cancellation,
concurrent delivery) and a TLS server that refuses our certificate with an alert.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web
from lab import ATT_OTHER, FP, IDENTITY, PRODUCER, TENANT, body_for
from stack import FEEDBACK_SEED, ROOT, Stack, free_port, toml_value

from audit import verify_file
from common.tls import server_context
from common.tomlfile import ConfigError
from emitter.campaign import run_campaign
from emitter.cli import main
from emitter.client import EmitterClient, QueryError, backoff_delay
from emitter.outbox import Outbox, OutboxItem
from emitter.settings import load_emitter_settings
from emitter.sync import SyncEmitterClient
from emitter.transport import MAX_RESPONSE_BYTES
from emitter.verify import FeedbackRejected
from fedgate.bootstrap import bootstrap
from fedgate.pki import init_pki
from gateway.feedback.issuer import bound_nonce, sign_feedback
from gateway.feedback.policy import DEFAULT_RULES_FILE
from gateway.http.server import start_gateway
from gateway.store import open_store
from keyring import Key, Keyring, PrivateKey
from keyring.keys import save_jwks
from schemas.routes import GRAPH_PATH, QUERY_PATH, TELEMETRY_PATH

ATT = body_for(GRAPH_PATH)["attestation_measurement_hash"]
FEEDBACK_KEY = PrivateKey(FEEDBACK_SEED)


# -- helpers ------------------------------------------------------------------------------

def telemetry(**changes) -> dict:
    body = body_for(TELEMETRY_PATH, **changes)
    body["payload"]["event_id"] = str(uuid.uuid4())
    return body


def foreign_telemetry() -> dict:
    """Signed and well-formed, but op-002 belongs to another tenant: 403 mapping_violation."""
    body = telemetry(operator_id="op-002")
    body["signed_metadata"]["operator_id"] = "op-002"
    return body


def write_config(stack: Stack, *, url: str | None = None, pins: list[str] | None = None,
                 name: str = "emitter.toml", **extra) -> Path:
    """An emitter config beside the stack: its PKI, the lab producer key, the feedback
    public key under kid vv-fb-2026; state in <tmp>/emitter/state."""
    root = stack.root / "emitter"
    root.mkdir(exist_ok=True)
    (root / "producer.pem").write_bytes(PRODUCER.to_pem())
    save_jwks(root / "feedback.jwks.json", Keyring([Key("vv-fb-2026", FEEDBACK_KEY.public)]))
    client = stack.pki.identities[IDENTITY]
    values = {
        "url": url or stack.url, "ca": str(stack.pki.ca.cert), "cert": str(client.cert),
        "key": str(client.key),
        "server_pins": [stack.pki.gateway.sha256] if pins is None else pins,
        "identity": IDENTITY, "signing_key": "producer.pem", "kid": "lab-2026",
        "feedback_keyring": "feedback.jwks.json", "state_dir": "state",
        "max_attempts": 2, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
        "request_timeout_s": 5, **extra,
    }
    path = root / name
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


def client_for(path: Path, **kwargs) -> EmitterClient:
    return EmitterClient(load_emitter_settings(path), **kwargs)


async def findings(stack: Stack) -> list[dict]:
    """Every finding record in the stack's store, with its signed body decoded."""
    store = open_store(stack.store_url)
    await store.open()
    try:
        raw = await store.list_records("finding", TENANT)
    finally:
        await store.close()
    records = [json.loads(r) for r in raw]
    for record in records:
        record["body"] = json.loads(base64.b64decode(record["body_b64"]))
    return records


def outbox_rows(path: Path) -> list[tuple]:
    """The outbox as another process would see it on disk."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, state, nonce, body, maybe_accepted, replaced_by "
                          "FROM outbox ORDER BY id").fetchall()


@pytest.fixture
def stack(tmp_path, sqlite_url):
    st = Stack(tmp_path, sqlite_url)
    yield st
    st.kill_all()


@pytest.fixture
async def gateway(stack):
    runner = await stack.start()
    yield stack
    await runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


class FakeServer:
    """A TLS 1.3 server with the gateway's certificate; ``handler`` answers every POST."""

    def __init__(self, stack: Stack, handler) -> None:
        self.stack, self.handler, self.calls = stack, handler, []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> FakeServer:
        async def record(request: web.Request) -> web.StreamResponse:
            self.calls.append((request.path, dict(request.headers), await request.read()))
            return await self.handler(request, self)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        pki = self.stack.pki
        ctx = server_context(pki.gateway.cert, pki.gateway.key, pki.ca.cert)
        await web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx).start()
        self.url = f"https://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


class LossyProxy:
    """A TCP pipe in front of the gateway that drops the next ``drop`` HTTP answers.

    TLS passes through untouched (pins and client certificates still hold). With TLS 1.3
    and no session tickets, whatever the gateway sends after the client's second flight
    (its Finished, then the request) is the HTTP answer: the proxy closes the client's
    connection instead of forwarding it — the request was processed, the 202 is lost.
    """

    def __init__(self, port: int, drop: int) -> None:
        self.port, self.drop, self.dropped = port, drop, 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> LossyProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, c_reader, c_writer) -> None:
        u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.port)
        phase = {"server_spoke": False, "client_after": False}

        async def upstream() -> None:
            while data := await c_reader.read(65536):
                phase["client_after"] |= phase["server_spoke"]
                u_writer.write(data)
            u_writer.close()

        async def downstream() -> None:
            while data := await u_reader.read(65536):
                if phase["client_after"] and self.drop > 0:
                    self.drop -= 1
                    self.dropped += 1
                    break  # the answer: lose it
                phase["server_spoke"] = True
                c_writer.write(data)
            c_writer.close()
            u_writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


# -- delivery -----------------------------------------------------------------------------

@pytest.mark.parametrize("store_url", ["sqlite", "redis"], indirect=True)
async def test_accepted_then_same_bytes_again_is_a_delivered_duplicate(tmp_path, store_url):
    st = Stack(tmp_path, store_url)
    runner = await st.start()
    try:
        async with client_for(write_config(st)) as client:
            result = await client.send_telemetry(telemetry())
            assert (result.outcome, result.status) == ("accepted", 202), result
            item = client.outbox.get(result.outbox_id)
            assert (item.state, item.request_id) == ("delivered", result.request_id)
            again = await client.deliver(item)  # the very same signed bytes
            assert (again.outcome, again.status) == ("duplicate", 409), again
            assert again.duplicate_of == result.request_id and again.delivered
            assert client.outbox.get(item.id).state == "delivered"
        [record] = await findings(st)
        assert base64.b64decode(record["body_b64"]) == item.body  # what was signed
        assert record["finding_id"] == result.finding_id
    finally:
        await runner.cleanup()


async def test_graph_accepted_and_outbox_survives_reopen(gateway):
    cfg = write_config(gateway)
    async with client_for(cfg) as client:
        result = await client.send_graph(body_for(GRAPH_PATH))
        assert (result.outcome, result.status) == ("accepted", 202), result
    outbox = Outbox(load_emitter_settings(cfg).state_dir / "outbox.db")
    try:
        assert outbox.counts() == {"delivered": 1}
    finally:
        outbox.close()


async def test_permanent_rejection_is_not_retried(gateway):
    async with client_for(write_config(gateway)) as client:
        result = await client.send_telemetry(foreign_telemetry())
        assert (result.outcome, result.status, result.error) == (
            "rejected", 403, "mapping_violation"), result
        item = client.outbox.get(result.outbox_id)
        assert (item.state, item.attempts) == ("rejected", 1)
        assert await client.flush() == []  # nothing pending: never resent


async def test_503_is_retried_with_the_same_signed_bytes(stack):
    async def flaky(request, server):
        if len(server.calls) == 1:
            return web.json_response({"accepted": False, "request_id": "r1",
                                      "error": "store_unavailable", "detail": "x"}, status=503)
        return web.json_response({"accepted": True, "request_id": "r2", "finding_id": "f2"},
                                 status=202)

    async with FakeServer(stack, flaky) as fake, \
            client_for(write_config(stack, url=fake.url)) as client:
        result = await client.send_telemetry(telemetry())
        assert (result.outcome, result.request_id) == ("accepted", "r2"), result
        (_, h1, b1), (_, h2, b2) = fake.calls
        assert b1 == b2
        sig = ("X-Telemetry-Timestamp", "X-Telemetry-Nonce", "X-Telemetry-Signature")
        assert [h1[k] for k in sig] == [h2[k] for k in sig]


async def test_lost_202_then_retry_gets_409_duplicate_of_and_counts_as_delivered(gateway):
    async with LossyProxy(gateway.port, drop=1) as proxy, \
            client_for(write_config(gateway, url=proxy.url)) as client:
        result = await client.send_telemetry(telemetry())
        item = client.outbox.get(result.outbox_id)
    assert proxy.dropped == 1
    assert result.outcome == "duplicate", result
    assert (item.state, item.maybe_accepted, item.attempts) == ("delivered", True, 2)
    [record] = await findings(gateway)
    assert result.duplicate_of == record["request_id"] == item.request_id


class HsmSigner:
    """What an HSM handle looks like to the client: .sign(bytes) and .public, no PEM."""

    def __init__(self, key: PrivateKey, public: bytes | None = None) -> None:
        self.key, self.public, self.calls = key, public or key.public, 0

    def sign(self, message: bytes) -> bytes:
        self.calls += 1
        return self.key.sign(message)


async def test_any_signer_object_works_and_a_broken_one_is_refused(gateway):
    settings = load_emitter_settings(write_config(gateway))
    signer = HsmSigner(PRODUCER)
    async with EmitterClient(settings, signer=signer) as client:
        assert (await client.send_telemetry(telemetry())).outcome == "accepted"
    assert signer.calls == 2  # the start-up self-check, then the request
    with pytest.raises(ConfigError, match="signing_key"):
        EmitterClient(settings, signer=HsmSigner(PRODUCER, public=FEEDBACK_KEY.public))


def test_backoff_is_exponential_capped_and_jittered():
    assert [backoff_delay(n, 0.5, 4, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [
        0.5, 1.0, 2.0, 4.0, 4.0]
    assert [backoff_delay(n, 0.5, 4, rng=lambda: 0.0) for n in (1, 4, 9)] == [0.25, 2.0, 2.0]


# -- refusals: http://, pins, redirects ---------------------------------------------------

async def test_http_url_is_refused(stack):
    cfg = write_config(stack, url=f"http://127.0.0.1:{stack.port}")
    with pytest.raises(ConfigError, match=r"url must use https://"):
        load_emitter_settings(cfg)
    settings = load_emitter_settings(write_config(stack, name="ok.toml"))
    with pytest.raises(ConfigError, match="https"):
        EmitterClient(dataclasses.replace(settings, url="http://127.0.0.1:1"))


def test_settings_resolve_relative_paths_and_name_the_bad_key(stack):
    upper = ":".join(stack.pki.gateway.sha256[i:i + 2].upper() for i in range(0, 64, 2))
    settings = load_emitter_settings(write_config(stack, pins=[upper]))
    root = stack.root / "emitter"
    assert settings.server_pins == (stack.pki.gateway.sha256,)
    assert (settings.signing_key, settings.state_dir) == (root / "producer.pem", root / "state")
    assert (settings.kid, settings.clock_skew_s, settings.legacy_unbound_nonce) == (
        "lab-2026", 30, False)
    for extra, key in [({"urll": "x"}, "unknown key 'urll'"), ({"server_pins": ["ab"]},
                       "server_pins"), ({"signing_key": "nope.pem"}, "signing_key: no such"),
                       ({"backoff_max_s": 0.01}, "backoff_max_s")]:
        with pytest.raises(ConfigError, match=key) as info:
            load_emitter_settings(write_config(stack, name="bad.toml", **extra))
        assert "\n" not in str(info.value)


async def test_wrong_server_pin_refuses_before_a_byte_reaches_the_gateway(gateway):
    wrong = write_config(gateway, pins=[gateway.pki.ca.sha256], name="wrong.toml")
    async with client_for(wrong) as client:
        result = await client.send_telemetry(telemetry())
        assert (result.outcome, result.error) == ("refused", "server_pin_mismatch"), result
        assert client.outbox.get(result.outbox_id).state == "pending"  # kept, not lost
    audit = gateway.audit_path
    assert not audit.exists() or audit.read_text() == ""  # the gateway saw nothing
    async with client_for(write_config(gateway)) as client:  # right pin: it goes out
        [late] = await client.flush()
    assert late.outcome == "accepted", late
    assert len(audit.read_text().splitlines()) == 1


async def test_redirect_is_never_followed(stack):
    async def redirect(request, server):
        if request.path == "/target":
            return web.json_response({"accepted": True, "request_id": "t"}, status=202)
        raise web.HTTPTemporaryRedirect(server.url + "/target")

    async with FakeServer(stack, redirect) as fake, \
            client_for(write_config(stack, url=fake.url)) as client:
        result = await client.send_telemetry(telemetry())
        state = client.outbox.get(result.outbox_id).state
    assert (result.outcome, result.status, result.error) == (
        "rejected", 307, "redirect_refused"), result
    assert state == "rejected"
    assert [path for path, _, _ in fake.calls] == [TELEMETRY_PATH]  # /target never called


# -- outages, restarts, expiry -------------------------------------------------------------

async def test_gateway_down_for_10s_mid_campaign_loses_no_telemetry(stack):
    stack.spawn()
    await stack.wait_ready()
    cfg = write_config(stack)
    bodies = [telemetry() for _ in range(10)]
    async with client_for(cfg) as client:
        first = [await client.send_telemetry(b) for b in bodies[:5]]
        assert [r.outcome for r in first] == ["accepted"] * 5
        stack.kill_all(signal.SIGKILL)
        down = [await client.send_telemetry(b) for b in bodies[5:]]
        assert [r.outcome for r in down] == ["queued"] * 5
        rows = outbox_rows(load_emitter_settings(cfg).state_dir / "outbox.db")
        assert [state for _, state, *_ in rows] == ["delivered"] * 5 + ["pending"] * 5
        assert [json.loads(row[3])["payload"]["event_id"] for row in rows[5:]] == [
            b["payload"]["event_id"] for b in bodies[5:]]
        await asyncio.sleep(5)
        assert [r.outcome for r in await client.flush()] == ["queued"] * 5  # still down
        await asyncio.sleep(5)
        stack.spawn()
        await stack.wait_ready()
        flushed = await client.flush()
        assert [r.outcome for r in flushed] == ["accepted"] * 5, flushed
        assert client.outbox.counts() == {"delivered": 10}
    stack.kill_all()
    records = await findings(stack)
    assert len(records) == 10
    assert sorted(r["body"]["payload"]["event_id"] for r in records) == sorted(
        b["payload"]["event_id"] for b in bodies)


async def test_outbox_survives_an_emitter_restart(stack):
    cfg = write_config(stack)
    client = client_for(cfg)
    async with client:  # gateway not started yet: nothing listens on its port
        queued = await client.send_telemetry(telemetry())
    assert queued.outcome == "queued"
    runner = await stack.start()
    try:
        async with client_for(cfg) as fresh:  # a new process would do exactly this
            [result] = await fresh.flush()
            assert (result.outcome, result.outbox_id) == ("accepted", queued.outbox_id)
        [record] = await findings(stack)
        assert record["nonce"] == outbox_rows(fresh.settings.state_dir / "outbox.db")[0][2]
    finally:
        await runner.cleanup()


async def test_expired_never_accepted_item_is_resigned_exactly_once(stack):
    clock = Clock()
    cfg = write_config(stack)
    async with client_for(cfg, clock=clock) as client:
        queued = await client.send_telemetry(telemetry())  # connection refused: not sent
        clock.now += 120  # a long outage: the timestamp has left the ±30 s window
        runner = await stack.start(clock=clock)
        try:
            [result] = await client.flush()
            old = client.outbox.get(queued.outbox_id)
            new = client.outbox.get(result.outbox_id)
        finally:
            await runner.cleanup()
    assert (result.outcome, result.possible_duplicate) == ("accepted", False), result
    assert (old.state, old.replaced_by, old.maybe_accepted) == ("expired", new.id, False)
    assert new.state == "delivered" and new.timestamp == old.timestamp + 120
    assert json.loads(new.body)["payload"] == json.loads(old.body)["payload"]
    [record] = await findings(stack)
    assert (record["nonce"], record["timestamp"]) == (new.nonce, new.timestamp)
    [event] = [json.loads(line) for line in stack.audit_path.read_text().splitlines()]
    assert event["event.action"] == "telemetry.accepted"  # the stale bytes never went out


async def test_gateway_clock_disagreeing_is_refused_and_kept(stack):
    clock, ahead = Clock(), Clock()
    ahead.now += 60
    runner = await stack.start(clock=ahead)
    try:
        async with client_for(write_config(stack), clock=clock) as client:
            result = await client.send_telemetry(telemetry())
            rows = client.outbox.pending()
    finally:
        await runner.cleanup()
    assert (result.outcome, result.error) == ("refused", "timestamp_out_of_window"), result
    assert [r.id for r in rows] == [result.outbox_id]  # re-signed once, still kept
    events = [json.loads(line) for line in stack.audit_path.read_text().splitlines()]
    assert [e["event.reason"] for e in events] == ["timestamp_out_of_window"] * 2


async def test_expired_maybe_accepted_item_is_resigned_at_least_once(stack):
    """The documented at-least-once case: a 202 was lost, the retry window passed, the
    body is re-signed with a fresh nonce — two findings, same payload.event_id."""
    clock = Clock()
    runner = await stack.start(clock=clock)
    try:
        async with LossyProxy(stack.port, drop=99) as proxy:
            cfg = write_config(stack, url=proxy.url)
            async with client_for(cfg, clock=clock) as client:
                queued = await client.send_telemetry(telemetry())
                assert queued.outcome == "queued"
                assert client.outbox.get(queued.outbox_id).maybe_accepted
                proxy.drop = 0
                clock.now += 120
                [result] = await client.flush()
    finally:
        await runner.cleanup()
    assert (result.outcome, result.possible_duplicate) == ("accepted", True), result
    records = await findings(stack)
    assert len(records) == 2
    assert len({r["body"]["payload"]["event_id"] for r in records}) == 1
    assert len({r["nonce"] for r in records}) == 2


def test_outbox_enqueue_is_durable_and_states_are_final(tmp_path):
    from emitter.signing import sign_request
    signed = sign_request(PRODUCER, telemetry(), identity=IDENTITY, kid="lab-2026",
                          timestamp=1_795_000_000, nonce="n" * 24)
    box = Outbox(tmp_path / "o.db")
    item = box.enqueue(signed, TELEMETRY_PATH)
    box.close()  # no flush, no shutdown hook: what is committed is on disk
    again = Outbox(tmp_path / "o.db")
    try:
        [pending] = again.pending()
        assert (pending.id, pending.body, pending.headers) == (item.id, signed.body,
                                                               signed.headers)
        again.mark_rejected(item.id, 422, "schema_violation")
        assert again.pending() == []
        assert again.get(item.id).last_error == "schema_violation"
    finally:
        again.close()


# -- feedback (§6) --------------------------------------------------------------------------

async def test_feedback_query_verifies_claims_and_never_reapplies(gateway):
    async with client_for(write_config(gateway)) as client:
        assert (await client.send_telemetry(telemetry())).outcome == "accepted"
        assert (await client.send_graph(body_for(GRAPH_PATH))).outcome == "accepted"
        first = await client.query_feedback(TENANT, "op-001")
        verified = client.last_feedback
        assert verified.kid == "vv-fb-2026" and client.ledger.claimed(verified.nonce)
        assert list(verified.adjustments) == first  # a fresh ledger applies them all
        with pytest.raises(FeedbackRejected) as info:  # the same answer twice: replay
            client.ledger.apply(verified, int(time.time()))
        assert info.value.code == "replayed_nonce"
        second = await client.query_feedback(TENANT, "op-001")
        assert client.last_feedback.nonce != verified.nonce
        assert not [adj for adj in second if adj in first]  # nothing applied twice
        assert client.ledger.applied(TENANT) == first + second
        audit_path = client.settings.state_dir / "emitter-audit.jsonl"
    events = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [e["event.action"] for e in events] == ["feedback.applied"] * 2
    assert verify_file(audit_path).ok


X2 = "5e" * 32  # an execution only the second emitter of the same identity sent


def telemetry_for(fp: str, att: str) -> dict:
    body = telemetry(execution_hash=fp)
    body["payload"]["attributes"].update(execution_fingerprint=fp,
                                         attestation_measurement_hash=att)
    return body


async def test_second_emitter_of_the_identity_does_not_block_feedback(stack, capsys, caplog):
    """§6 step 8 [v1.1], real gateway: emitter A sent X1 (FP), emitter B — same identity,
    its own state dir — sent X2. A's answer carries both: A applies X1's adjustment and
    reports X2 skipped (unknown_execution) in its result, audit event, log and CLI."""
    runner = await with_policy(stack).start()
    try:
        cfg_a = write_config(stack)
        cfg_b = write_config(stack, name="b.toml", state_dir="state-b")
        async with client_for(cfg_b) as b:
            assert (await b.send_telemetry(telemetry_for(X2, ATT_OTHER))).outcome == "accepted"
        async with client_for(cfg_a) as a:
            assert (await a.send_telemetry(telemetry())).outcome == "accepted"
            applied = await a.query_feedback(TENANT, "op-001")
            verified = a.last_feedback
            audit_path = a.settings.state_dir / "emitter-audit.jsonl"
        assert applied and {adj["execution_fingerprint"] for adj in applied} == {FP}
        assert verified.skipped_executions and set(verified.skipped_executions) == {X2}
        assert [adj["attestation_measurement_hash"] for adj in verified.skipped] == [
            ATT_OTHER] * len(verified.skipped)
        [event] = [json.loads(line) for line in audit_path.read_text().splitlines()]
        assert (event["event.action"], event["event.outcome"]) == ("feedback.applied",
                                                                   "success")
        assert event["feedback.adjustments"] == len(applied)
        assert event["feedback.skipped_executions"] == verified.skipped_executions
        assert event["feedback.skip_reason"] == "unknown_execution"
        assert verify_file(audit_path).ok
        assert any("unknown_execution" in r.getMessage() and X2 in r.getMessage()
                   for r in caplog.records if r.name == "fedgate.emitter")
        code, lines, err = await run_cli(capsys, "feedback", "--config", str(cfg_a),
                                         "--tenant", TENANT, "--operator", "op-001")
        assert code == 0 and lines == []  # verified; X1's adjustment is already in force
        assert f"skipped adjustment for execution {X2}: unknown_execution" in err
        assert f"{len(verified.skipped)} skipped)" in err
        # B's own view is the mirror image: X1 is unknown to it, X2's adjustment applies
        async with client_for(cfg_b) as b:
            applied_b = await b.query_feedback(TENANT, "op-001")
        assert {adj["execution_fingerprint"] for adj in applied_b} == {X2}
        assert set(b.last_feedback.skipped_executions) == {FP}
    finally:
        await runner.cleanup()


async def test_wiped_state_dir_still_rejects_a_mismatch_on_a_sent_execution(stack):
    """The other half of step 8: an execution the emitter DID send, answered with another
    attestation hash, still rejects the whole answer, even beside an unknown one."""
    data = [adjustment(att=ATT_OTHER) | {"execution_fingerprint": X2}, adjustment("0" * 64)]
    async with FakeServer(stack, forged_feedback(data)) as fake, \
            client_for(write_config(stack, url=fake.url)) as client:
        client.ledger.record_sent(TENANT, FP, ATT)
        with pytest.raises(FeedbackRejected) as info:
            await client.query_feedback(TENANT, "op-001")
        assert info.value.code == "attestation_mismatch"
        assert client.ledger.applied(TENANT) == [] and client.last_feedback is None


def forged_feedback(data: list, *, key: PrivateKey = FEEDBACK_KEY, nonce: str | None = None):
    async def answer(request, server):
        query = json.loads(await request.read())
        return web.json_response(sign_feedback(
            key, "vv-fb-2026", tenant_id=TENANT, data=data, signed_at=int(time.time()),
            nonce=nonce or bound_nonce(query["nonce"]), request_id="fake"))
    return answer


def adjustment(att: str = ATT) -> dict:
    return {"tenant_id": TENANT, "execution_fingerprint": FP, "target_urn": "urn:target:ws-17",
            "action": "isolate", "confidence": 0.9, "rationale": "r", "control": "edr",
            "ttl_seconds": 600, "timestamp": 1_795_000_000,
            "schema_version": "feedback.adjustment.v1", "attestation_measurement_hash": att}


async def test_verified_adjustments_apply_once(stack):
    async with FakeServer(stack, forged_feedback([adjustment()])) as fake, \
            client_for(write_config(stack, url=fake.url)) as client:
        client.ledger.record_sent(TENANT, FP, ATT)  # what this emitter sent
        assert await client.query_feedback(TENANT, "op-001") == [adjustment()]
        assert await client.query_feedback(TENANT, "op-001") == []  # verified, not new
        assert client.ledger.applied(TENANT) == [adjustment()]


@pytest.mark.parametrize(("answer", "code"), [
    (forged_feedback([adjustment(att="0" * 64)]), "attestation_mismatch"),
    (forged_feedback([adjustment()], key=PRODUCER), "invalid_signature"),
    (forged_feedback([adjustment()], nonce="someone-elses-nonce.abcdefghijklmnopq"),
     "nonce_not_bound"),
])
async def test_rejected_feedback_applies_nothing_and_is_audited(stack, answer, code):
    async with FakeServer(stack, answer) as fake, \
            client_for(write_config(stack, url=fake.url)) as client:
        client.ledger.record_sent(TENANT, FP, ATT)
        with pytest.raises(FeedbackRejected) as info:
            await client.query_feedback(TENANT, "op-001")
        assert info.value.code == code
        assert client.ledger.applied(TENANT) == []
        assert client.last_feedback is None
        audit_path = client.settings.state_dir / "emitter-audit.jsonl"
    [event] = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert (event["event.action"], event["event.reason"]) == ("feedback.rejected", code)
    assert [p for p, _, _ in fake.calls] == [QUERY_PATH]


async def test_sync_client_for_scripts(gateway):
    cfg = write_config(gateway)

    def script():
        with SyncEmitterClient(str(cfg)) as client:
            sent = client.send_telemetry(telemetry())
            adjustments = client.query_feedback(TENANT, "op-001")
            return sent, adjustments, client.flush()

    sent, adjustments, flushed = await asyncio.to_thread(script)
    assert sent.outcome == "accepted" and isinstance(adjustments, list) and flushed == []


# -- CLI --------------------------------------------------------------------------------------

async def run_cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


async def test_cli_emit_array_and_json_lines(gateway, capsys, tmp_path):
    cfg = str(write_config(gateway))
    array = tmp_path / "two.json"
    array.write_text(json.dumps([telemetry(), telemetry()]))
    code, lines, _ = await run_cli(capsys, "emit", "--config", cfg, str(array))
    assert code == 0 and len(lines) == 2
    assert all(line.startswith("accepted ") and " finding " in line for line in lines), lines
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text(json.dumps(telemetry()) + "\n\n" + json.dumps(foreign_telemetry()) + "\n")
    code, lines, _ = await run_cli(capsys, "emit", "--config", cfg, str(jsonl))
    assert code == 1
    assert lines[0].startswith("accepted ")
    assert lines[1] == "rejected 403 mapping_violation: the operator is not mapped to this tenant"
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(body_for(GRAPH_PATH)))
    code, lines, _ = await run_cli(capsys, "emit", "--config", cfg, "--graph", str(graph))
    assert code == 0 and lines[0].startswith("accepted "), lines
    assert len(await findings(gateway)) == 3


async def test_cli_emit_from_stdin_reports_progress(gateway, capsys, monkeypatch):
    lines_in = "\n".join(json.dumps(telemetry()) for _ in range(120))
    monkeypatch.setattr("sys.stdin", io.StringIO(lines_in))
    code, lines, err = await run_cli(capsys, "emit", "--config", str(write_config(gateway)))
    assert code == 0 and len(lines) == 120
    assert "fedgate: sent 100 of 120\n" in err and err.endswith("fedgate: sent 120 of 120\n")
    assert len(await findings(gateway)) == 120


async def test_cli_emit_queues_when_the_gateway_is_down(stack, capsys, tmp_path):
    body = tmp_path / "one.json"
    body.write_text(json.dumps(telemetry()))
    cfg = str(write_config(stack))
    code, lines, _ = await run_cli(capsys, "emit", "--config", cfg, str(body))
    assert (code, lines) == (0, ["queued (gateway unavailable; will retry)"])
    runner = await stack.start()
    try:  # the next run delivers what the last one queued, before its own input
        empty = tmp_path / "none.json"
        empty.write_text("[]")
        code, lines, err = await run_cli(capsys, "emit", "--config", cfg, str(empty))
    finally:
        await runner.cleanup()
    assert code == 0 and len(lines) == 1 and lines[0].startswith("accepted "), lines
    assert err.endswith("fedgate: sent 1 of 1\n")
    assert len(await findings(stack)) == 1


async def test_cli_config_and_input_errors_exit_2_with_one_line(stack, capsys, tmp_path):
    bad = write_config(stack, clock_skew_s="30")
    code, _, err = await run_cli(capsys, "emit", "--config", str(bad), "-")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "clock_skew_s" in err
    cfg = str(write_config(stack, name="ok.toml"))
    garbage = tmp_path / "bad.json"
    garbage.write_text('{"a": 1}\n[1]\n')
    code, _, err = await run_cli(capsys, "emit", "--config", cfg, str(garbage))
    assert code == 2 and "line 2: not a JSON object" in err


async def test_cli_feedback_verified_and_rejected(gateway, capsys):
    cfg = str(write_config(gateway))
    args = ("feedback", "--config", cfg, "--tenant", TENANT, "--operator", "op-001")
    code, lines, err = await run_cli(capsys, *args)
    assert code == 0 and "feedback verified (kid vv-fb-2026" in err
    assert all(json.loads(line)["tenant_id"] == TENANT for line in lines)
    async with FakeServer(gateway, forged_feedback([], key=PRODUCER)) as fake:
        forged = str(write_config(gateway, url=fake.url, name="forged.toml"))
        code, lines, err = await run_cli(capsys, "feedback", "--config", forged,
                                         *args[3:])
    assert (code, lines) == (1, []) and "feedback rejected: invalid_signature" in err


@pytest.mark.parametrize("command", ["emit", "feedback"])
async def test_cli_help(capsys, command):
    code, lines, _ = await run_cli(capsys, command, "--help")
    assert code == 0 and lines[0].startswith(f"usage: fedgate {command}")


# -- review fixes: each test below failed on the code before its fix -----------------------

# F1: an adjustment is applied once while in force, whatever its `timestamp` says --------

def with_policy(stack: Stack) -> Stack:
    """The stack's gateway with the repository's policy rules (the lab body — high
    severity, T1059.001 — matches ``tighten-high-severity-scripting``, ttl 1800 s)."""
    rules = DEFAULT_RULES_FILE
    with stack.config_path.open("a", encoding="utf-8") as cfg:
        cfg.write(f"\n[policy]\nrules = {toml_value(str(rules))}\n")
    return stack


def _identity(adj: dict) -> tuple:
    return tuple(adj[k] for k in ("tenant_id", "execution_fingerprint", "action", "control",
                                  "target_urn", "attestation_measurement_hash"))


async def test_same_adjustment_is_applied_once_until_its_ttl_expires(stack):
    """The real gateway stamps each adjustment with the time it answers: queried at t,
    t+1, t+5 the same adjustment comes back with three timestamps and is applied once;
    after its ttl it is applied again (a refresh)."""
    t = [float(int(time.time()))]
    runner = await with_policy(stack).start(clock=lambda: t[0])
    try:
        async with client_for(write_config(stack), clock=lambda: t[0]) as client:
            assert (await client.send_telemetry(telemetry())).outcome == "accepted"
            assert (await client.send_graph(body_for(GRAPH_PATH))).outcome == "accepted"
            t0 = int(t[0])
            first = await client.query_feedback(TENANT, "op-001")
            assert first and {a["timestamp"] for a in first} == {t0}
            for delta in (1, 5):
                t[0] = t0 + delta
                assert await client.query_feedback(TENANT, "op-001") == []
                reissued = client.last_feedback.adjustments  # verified, not applied
                assert [_identity(a) for a in reissued] == [_identity(a) for a in first]
                assert {a["timestamp"] for a in reissued} == {t0 + delta}
            ttl = min(a["ttl_seconds"] for a in first)
            t[0] = t0 + ttl - 1
            assert await client.query_feedback(TENANT, "op-001") == []  # last second in force
            t[0] = t0 + ttl
            again = await client.query_feedback(TENANT, "op-001")  # expired: refreshed
            assert [_identity(a) for a in again] == [_identity(a) for a in first]
            assert {a["timestamp"] for a in again} == {t0 + ttl}
            assert client.ledger.applied(TENANT) == first + again
            assert client.ledger.in_force(t0 + ttl, TENANT) == again
    finally:
        await runner.cleanup()


async def test_campaign_second_query_applies_nothing_when_seconds_apart(tmp_path):
    """emitter/campaign.py's last step, with the gateway's and the emitter's clock moving
    3 s after every feedback query: the re-issued adjustments verify and none re-applies."""
    layout = bootstrap(tmp_path / "campaign", port=free_port())
    t = [float(int(time.time()))]
    runner = await start_gateway(layout.gateway_config, clock=lambda: t[0])
    start = t[0]

    def progress(step: str) -> None:
        if step.startswith("feedback"):
            t[0] += 3

    try:
        async with EmitterClient(load_emitter_settings(layout.emitter_config),
                                 clock=lambda: t[0]) as client:
            report = await run_campaign(client, progress)
            last = client.last_feedback
    finally:
        await runner.cleanup()
    assert t[0] - start == 6  # the second round ran 6 s after the first query
    assert report.reapplied == 0 and report.applied
    assert "second query applies nothing twice" in report.steps
    assert last.adjustments and {a["timestamp"] for a in last.adjustments} == {int(t[0])}


# F2: a re-sign is one transaction ---------------------------------------------------------

RESIGN_CHILD = r"""
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, "tests")
from lab import IDENTITY, PRODUCER
from emitter.outbox import Outbox
from emitter.signing import sign_request

path, kill_at = Path(sys.argv[1]), sys.argv[2]
box = Outbox(path)
now = int(time.time())
old = box.enqueue(sign_request(PRODUCER, {"a": 1}, identity=IDENTITY, kid=None,
                               timestamp=now - 60, nonce="o" * 24), "/internal/v1/telemetry")
seen = []

def trace(sql):  # runs as each statement starts, before SQLite executes it
    seen.append(sql)
    if kill_at != "none" and sql.startswith(kill_at) and any("INSERT" in s for s in seen):
        os.kill(os.getpid(), signal.SIGKILL)

box._db.set_trace_callback(trace)
box.resign(old.id, sign_request(PRODUCER, {"a": 1}, identity=IDENTITY, kid=None,
                                timestamp=now, nonce="n" * 24))
print("resigned", flush=True)
"""


@pytest.mark.parametrize("kill_at", ["UPDATE outbox SET state = 'expired'", "COMMIT", "none"])
def test_resign_killed_midway_leaves_exactly_one_pending_row(tmp_path, kill_at):
    """SIGKILL between the INSERT of the re-signed row and the UPDATE expiring the old one
    (or just before COMMIT): the old row alone stays pending — never both."""
    db = tmp_path / "outbox.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", RESIGN_CHILD, str(db), kill_at], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=60)
    killed = kill_at != "none"
    assert child.returncode == (-signal.SIGKILL if killed else 0), child.stderr
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT nonce, state FROM outbox ORDER BY id").fetchall()
    pending = [nonce for nonce, state in rows if state == "pending"]
    assert pending == ["o" * 24] if killed else ["n" * 24]
    assert rows == ([("o" * 24, "pending")] if killed else
                    [("o" * 24, "expired"), ("n" * 24, "pending")])


# F3: a crash after the gateway accepted, before the row was marked delivered ---------------

CRASH_CHILD = r"""
import asyncio, json, os, signal, sys, time
from emitter.client import EmitterClient
from emitter.outbox import Outbox
from emitter.settings import load_emitter_settings

config, body, offset = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])

def crash(self, item_id, request_id, status=202):  # the 202 is in; nothing recorded yet
    print("got", status, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

Outbox.mark_delivered = crash

async def main():
    settings = load_emitter_settings(config)
    async with EmitterClient(settings, clock=lambda: time.time() + offset) as client:
        await client.send_telemetry(body)

asyncio.run(main())
"""


def crash_after_202(cfg: Path, body: dict, offset: float = 0.0) -> OutboxItem:
    """A real emitter process sends ``body`` (its clock ``offset`` s off), gets the 202
    and is SIGKILLed before it marks the row delivered. → the row it left."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(cfg), json.dumps(body),
                            str(offset)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.strip() == "got 202"
    box = Outbox(load_emitter_settings(cfg).state_dir / "outbox.db")
    try:
        [row] = box.pending()
    finally:
        box.close()
    return row


def restarted_clock(row: OutboxItem, age: float):
    """The restarted emitter's clock: ``row`` is ``age`` seconds old now, and time runs."""
    started = time.time()
    return lambda: row.timestamp + age + (time.time() - started)


async def test_crash_after_202_resends_the_same_bytes_inside_the_window(stack):
    """Restarted 26 s after signing (inside the ±30 s window, but past the early re-sign
    margin): the row is known maybe-accepted, so the SAME bytes go out first; the
    gateway answers 409 duplicate_of and there is one finding, not two."""
    stack.spawn()
    await stack.wait_ready()
    cfg = write_config(stack)
    row = crash_after_202(cfg, telemetry())
    assert row.maybe_accepted and row.attempts == 1
    async with client_for(cfg, clock=restarted_clock(row, 26)) as client:
        [result] = await client.flush()
        item = client.outbox.get(row.id)
        sent = client.ledger.sent_for(TENANT)
    stack.kill_all()
    [record] = await findings(stack)
    assert (result.outcome, result.outbox_id, result.status) == ("duplicate", row.id, 409)
    assert result.duplicate_of == record["request_id"] == item.request_id
    assert item.state == "delivered" and record["nonce"] == row.nonce
    assert sent == {FP: ATT}


async def test_crash_after_202_then_window_passed_is_flagged_possible_duplicate(stack):
    """Restarted after the window: the bytes cannot be recognised any more, so the body
    is re-signed — and the new row says it may duplicate an accepted one."""
    stack.spawn()
    await stack.wait_ready()
    cfg = write_config(stack)
    row = crash_after_202(cfg, telemetry(), offset=-20)  # accepted: 20 s is inside ±30
    async with client_for(cfg, clock=restarted_clock(row, 35)) as client:
        [result] = await client.flush()
        old, new = client.outbox.get(row.id), client.outbox.get(result.outbox_id)
    stack.kill_all()
    assert (result.outcome, result.possible_duplicate) == ("accepted", True), result
    assert (old.state, old.replaced_by, new.possible_duplicate) == ("expired", new.id, True)
    records = await findings(stack)
    assert len(records) == 2 and {r["nonce"] for r in records} == {row.nonce, new.nonce}


async def test_cancelled_send_leaves_the_row_maybe_accepted(stack):
    """Cancelled while the request is out (a fake: the real gateway answers too fast to
    cancel reliably): the row stays pending and is flagged maybe_accepted."""
    arrived, released = asyncio.Event(), asyncio.Event()

    async def hang(request, server):
        arrived.set()
        await released.wait()
        return web.json_response({}, status=202)

    async with FakeServer(stack, hang) as fake, \
            client_for(write_config(stack, url=fake.url)) as client:
        task = asyncio.create_task(client.send_telemetry(telemetry()))
        await asyncio.wait_for(arrived.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [row] = client.outbox.pending()
        released.set()
    assert (row.maybe_accepted, row.attempts) == (True, 1)


# F4: hostile answers -----------------------------------------------------------------------

DEEP = b"[" * 200_000
TEN_MIB = 10 * 1024 * 1024


def raw_answer(status: int, body: bytes, *, chunked: bool = False):
    async def answer(request, server):
        if not chunked:
            return web.Response(status=status, body=body, content_type="application/json")
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for at in range(0, len(body), 1 << 20):
            try:
                await resp.write(body[at:at + (1 << 20)])
            except (ConnectionError, RuntimeError):  # the client hung up: as it should
                break
        return resp
    return answer


def unsigned_answer(**adjustment_changes):
    """A 200 in the §6 shape whose adjustment has ``adjustment_changes`` (not signed:
    step 1 judges it before the signature)."""
    async def answer(request, server):
        query = json.loads(await request.read())
        data = [{**adjustment(), **adjustment_changes}]
        text = json.dumps({"data": data, "signature": "x", "kid": "vv-fb-2026",
                           "signature_algorithm": "Ed25519", "signed_at": int(time.time()),
                           "nonce": bound_nonce(query["nonce"]),
                           "schema_version": "feedback.response.v1"})
        return web.Response(status=200, text=text, content_type="application/json")
    return answer


def signed_adjustment(**changes) -> dict:
    return {**adjustment(), **changes}


HOSTILE_QUERY_ANSWERS = {
    "nested_200000_deep": raw_answer(200, DEEP),
    "confidence_10_pow_400": unsigned_answer(confidence=10**400),
    "signed_timestamp_2_pow_63": forged_feedback([signed_adjustment(timestamp=2**63)]),
    "body_10_MiB": raw_answer(200, b'"' + b"a" * TEN_MIB + b'"'),
    "body_10_MiB_chunked": raw_answer(200, b'"' + b"a" * TEN_MIB + b'"', chunked=True),
    "more_adjustments_than_limit": forged_feedback(
        [adjustment(), signed_adjustment(action="observe")]),
}


@pytest.mark.parametrize("name", list(HOSTILE_QUERY_ANSWERS))
async def test_hostile_feedback_answer_is_an_audited_malformed_response(stack, name):
    async with FakeServer(stack, HOSTILE_QUERY_ANSWERS[name]) as fake, \
            client_for(write_config(stack, url=fake.url)) as client:
        client.ledger.record_sent(TENANT, FP, ATT)
        with pytest.raises(FeedbackRejected) as info:
            await client.query_feedback(TENANT, "op-001", limit=1)
        assert info.value.code == "malformed_response", info.value
        assert client.ledger.applied(TENANT) == []
        audit_path = client.settings.state_dir / "emitter-audit.jsonl"
    if name.startswith("body_10_MiB"):  # refused at the cap, never buffered whole
        assert info.value.detail == f"answer body larger than {MAX_RESPONSE_BYTES} bytes " \
            "(status 200)"
    [event] = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert (event["event.action"], event["event.reason"]) == ("feedback.rejected",
                                                              "malformed_response")
    assert verify_file(audit_path).ok


@pytest.mark.parametrize("name", ["nested_200000_deep", "body_10_MiB", "body_10_MiB_chunked"])
async def test_hostile_telemetry_answer_keeps_the_row_pending(stack, name):
    """A 202 whose body is not a usable answer decides nothing: the row stays pending,
    maybe accepted, with the reason recorded; the same bytes go out again later."""
    body = DEEP if name.startswith("nested") else b'"' + b"a" * TEN_MIB + b'"'
    answer = raw_answer(202, body, chunked=name.endswith("chunked"))
    async with FakeServer(stack, answer) as fake, \
            client_for(write_config(stack, url=fake.url)) as client:
        result = await client.send_telemetry(telemetry())
        row = client.outbox.get(result.outbox_id)
    assert result.outcome == "queued", result
    assert (row.state, row.maybe_accepted, row.attempts) == ("pending", True, 2)
    assert row.last_error == (f"malformed_response: answer body larger than "
                              f"{MAX_RESPONSE_BYTES} bytes (status 202)"
                              if "MiB" in name else "202 malformed_response")
    assert len({b for _, _, b in fake.calls}) == 1  # the same signed bytes each time


@pytest.mark.parametrize("name", list(HOSTILE_QUERY_ANSWERS))
async def test_cli_feedback_hostile_answer_is_one_line_exit_1(stack, capsys, name):
    async with FakeServer(stack, HOSTILE_QUERY_ANSWERS[name]) as fake:
        cfg = str(write_config(stack, url=fake.url))
        code, lines, err = await run_cli(capsys, "feedback", "--config", cfg, "--tenant",
                                         TENANT, "--operator", "op-001", "--limit", "1")
    assert (code, lines) == (1, [])
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "feedback rejected: malformed_response" in err


async def test_cli_emit_hostile_answer_is_no_traceback(stack, capsys, tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(telemetry()))
    async with FakeServer(stack, raw_answer(202, DEEP)) as fake:
        cfg = str(write_config(stack, url=fake.url))
        code, lines, err = await run_cli(capsys, "emit", "--config", cfg, str(one))
    assert (code, lines) == (0, ["queued (gateway unavailable; will retry)"])
    assert "Traceback" not in err


# F5: only an accepted attestation hash binds an execution ------------------------------------

async def test_rejected_body_does_not_lock_the_execution_hash(stack):
    """A mistyped hash (422), then a body with another well-formed hash that the gateway
    also refuses (422): neither binds; the corrected body is accepted and its feedback
    verifies. Only a hash the gateway ACCEPTED makes a different one refused locally."""
    runner = await with_policy(stack).start()
    try:
        await _no_lock_on_rejected_hash(stack)
    finally:
        await runner.cleanup()


async def _no_lock_on_rejected_hash(gateway: Stack) -> None:
    async with client_for(write_config(gateway)) as client:
        typo = telemetry()
        typo["payload"]["attributes"]["attestation_measurement_hash"] = ATT[:-1] + "g"
        bad = await client.send_telemetry(typo)
        assert (bad.outcome, bad.status, bad.error) == ("rejected", 422, "schema_violation")
        other = telemetry()
        other["payload"]["attributes"]["attestation_measurement_hash"] = ATT_OTHER
        other["payload"]["severity"] = "catastrophic"  # refused by the schema
        bad = await client.send_telemetry(other)
        assert (bad.outcome, bad.status, bad.error) == ("rejected", 422, "schema_violation")
        assert client.ledger.sent_for(TENANT) == {}
        good = await client.send_telemetry(telemetry())
        assert good.outcome == "accepted", good
        assert client.ledger.sent_for(TENANT) == {FP: ATT}
        assert (await client.send_graph(body_for(GRAPH_PATH))).outcome == "accepted"
        applied = await client.query_feedback(TENANT, "op-001")
        assert applied and {a["attestation_measurement_hash"] for a in applied} == {ATT}
        conflict = telemetry()
        conflict["payload"]["attributes"]["attestation_measurement_hash"] = ATT_OTHER
        local = await client.send_telemetry(conflict)
        assert (local.outcome, local.status, local.error, local.outbox_id) == (
            "rejected", None, "attestation_mismatch", None)


# F6: private state ------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_state_dir_and_files_are_private(gateway):
    cfg = write_config(gateway)
    state = load_emitter_settings(cfg).state_dir
    (state / "outbox.db").touch(mode=0o644)  # left by an older version: tightened
    (state / "outbox.db").chmod(0o644)
    async with client_for(cfg) as client:
        assert (await client.send_telemetry(telemetry())).outcome == "accepted"
        await client.query_feedback(TENANT, "op-001")
        files = sorted(p.name for p in state.iterdir())
        modes = {p.name: _mode(p) for p in state.iterdir()}
    assert {"outbox.db", "emitter.db", "emitter-audit.jsonl", "outbox.db-wal",
            "emitter.db-wal"} <= set(files)
    assert _mode(state) == 0o700
    assert modes == dict.fromkeys(files, 0o600)


def _group_writable(path: Path) -> None:
    path.mkdir()
    path.chmod(0o770)


def _other_writable(path: Path) -> None:
    path.mkdir()
    path.chmod(0o1777)


def _foreign(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)


@pytest.mark.parametrize("make", [_group_writable, _other_writable, _foreign])
async def test_unsafe_state_dir_is_refused(stack, make):
    good = load_emitter_settings(write_config(stack))
    unsafe = stack.root / "emitter" / "unsafe"
    make(unsafe)
    with pytest.raises(ConfigError, match=r"state_dir") as info:
        load_emitter_settings(write_config(stack, name="unsafe.toml", state_dir="unsafe"))
    assert "\n" not in str(info.value) and str(unsafe) in str(info.value)
    client = EmitterClient(dataclasses.replace(good, state_dir=unsafe))
    with pytest.raises(ConfigError, match=r"state_dir"):
        await client.open()
    await client.close()
    assert list(unsafe.iterdir()) == []


# F7: `fedgate emit` checks all input before it sends anything -----------------------------

@pytest.mark.parametrize(("text", "where"), [
    ('{good}\n{bad}\n'.replace("{bad}", '{"x": 1e400}'), "line 2"),
    ('[{good}, {"weight": -1e999}]', "item 2"),
    ('{good}\n\n{good}\n{"x": [1, {"y": Infinity}]}\n', "line 4"),
    ('[{good}, {"x": NaN}]', "item 2"),
])
async def test_cli_emit_bad_item_sends_nothing(gateway, capsys, tmp_path, text, where):
    data = tmp_path / "input.json"
    data.write_text(text.replace("{good}", json.dumps(telemetry())))
    code, lines, err = await run_cli(capsys, "emit", "--config", str(write_config(gateway)),
                                     str(data))
    assert (code, lines) == (2, [])
    assert err.count("\n") == 2 and where in err and "finite" in err, err  # the item, the verdict
    assert err.endswith(" item(s) invalid; nothing sent (fix them, or --skip-invalid to "
                        "send the valid ones)\n")
    assert await findings(gateway) == []
    assert not gateway.audit_path.exists() or gateway.audit_path.read_text() == ""


# F8: flush re-reads each row ---------------------------------------------------------------

async def test_flush_skips_a_row_another_task_settled_meanwhile(stack):
    """Two stale rows; while flush waits on the first (re-signed, held by a fake
    gateway), another task delivers the second. flush must not re-sign or resend it, and
    a row being delivered is not sent twice."""
    release = asyncio.Event()

    async def answer(request, server):
        if len(server.calls) == 1:
            await release.wait()
        return web.json_response({"accepted": True, "request_id": f"r{len(server.calls)}",
                                  "finding_id": "f"}, status=202)

    clock = Clock()
    async with FakeServer(stack, answer) as fake, \
            client_for(write_config(stack, url=fake.url), clock=clock) as client:
        clock.now -= 40
        first = client.outbox.enqueue(client.sign(telemetry()), TELEMETRY_PATH)
        second = client.outbox.enqueue(client.sign(telemetry()), TELEMETRY_PATH)
        clock.now += 40
        flushing = asyncio.create_task(client.flush())
        while not fake.calls:
            await asyncio.sleep(0.01)
        [held] = [i for i in client.outbox.pending_ids() if i not in (first.id, second.id)]
        busy = await client.deliver(client.outbox.get(held))  # in flight: not sent again
        other = await client.deliver(client.outbox.get(second.id))
        release.set()
        results = await flushing
        counts = client.outbox.counts()
    assert (busy.outcome, busy.detail) == ("queued", "already being delivered")
    assert other.outcome == "accepted" and other.outbox_id not in (first.id, second.id)
    assert [(r.outcome, r.outbox_id) for r in results] == [("accepted", held)]
    assert len(fake.calls) == 2
    assert counts == {"expired": 2, "delivered": 2}


# TLS: a handshake the gateway refuses with an alert is "refused", not "maybe accepted" ----

class AlertingTlsServer:
    """A fake: a TLS 1.3 server (OpenSSL via ``ssl``) with the gateway's certificate that
    trusts another CA for clients, so it ends our handshake with an ``unknown_ca`` alert
    after our side finished (the real gateway on asyncio resets instead of alerting)."""

    def __init__(self, stack: Stack, client_ca: Path) -> None:
        pki = stack.pki
        self.ctx = server_context(pki.gateway.cert, pki.gateway.key, client_ca)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.handshakes: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes.append("ok")
                    tls.recv(1)
            except (ssl.SSLError, OSError) as exc:
                self.handshakes.append(type(exc).__name__)
                try:  # drain the request so closing sends FIN, not a reset eating the alert
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass
            finally:
                conn.close()

    def __enter__(self) -> AlertingTlsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


async def test_tls_alert_after_our_handshake_is_refused_not_maybe_accepted(stack, tmp_path):
    other = init_pki(tmp_path / "other-ca", [IDENTITY])
    with AlertingTlsServer(stack, other.ca.cert) as server:
        cfg = write_config(stack, url=server.url)
        async with client_for(cfg) as client:
            result = await client.send_telemetry(telemetry())
            row = client.outbox.get(result.outbox_id)
            with pytest.raises(QueryError) as info:
                await client.query_feedback(TENANT, "op-001")
    assert (result.outcome, result.error) == ("refused", "tls_handshake_failed"), result
    assert "ALERT_UNKNOWN_CA" in result.detail
    assert (row.state, row.maybe_accepted, row.attempts) == ("pending", False, 1)
    assert info.value.code == "tls_handshake_failed"
    assert server.handshakes and "ok" not in server.handshakes
