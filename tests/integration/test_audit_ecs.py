"""[v1.1] PROTOCOL.md §7 ECS alignment, checked against the ECS field reference itself.

tests/data/ecs_flat_subset.json is an excerpt of the official ECS 8.11.0 flat field
reference (source and licence in its ``_about``). Every event below comes from real
code paths: a gateway over real mTLS sockets (accepted; a rejection of each category —
authentication, iam, web, database from a real SQLITE_FULL; a request for no route;
bytes that are not HTTP; a refused TLS handshake) and a real emitter verifying a real
feedback answer. Each must use only fields ECS defines (with a value of that field's
type) or ``fedgate.`` members or the documented pre-v1.1 aliases (equal to their new
names); ``event.kind``/``event.category``/``event.type``/``event.outcome`` must be allowed
values, each type expected for one of the event's categories and each category given one
of its expected types.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from lab import IDENTITY, NOW, PRODUCER, TENANT, Lab, body_for, raw_signed
from stack import FEEDBACK_SEED, Stack, toml_value

from audit import feedback_event, verify_file
from audit.ecs import ECS_VERSION, EXPECTED_TYPES, LEGACY_ALIASES
from audit.events import FEEDBACK_CATEGORIES
from emitter.client import EmitterClient
from emitter.settings import load_emitter_settings
from keyring import Key, Keyring, PrivateKey
from keyring.keys import save_jwks
from schemas.routes import GRAPH_PATH, QUERY_PATH, TELEMETRY_PATH
from schemas.validate import Validators

REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "ecs_flat_subset.json")
                       .read_text(encoding="utf-8"))
FIELDS: dict[str, dict] = REFERENCE["fields"]
ALLOWED = {name: {v["name"]: v.get("expected_event_types") for v in FIELDS[name]
                  ["allowed_values"]}
           for name in ("event.kind", "event.category", "event.type", "event.outcome")}
STRINGS = {"keyword", "constant_keyword", "wildcard", "match_only_text", "text"}
INTEGERS = {"long": 63, "integer": 31, "short": 15, "byte": 7}
#: on every event; REQUEST on every gateway event about an HTTP request
ALWAYS = {"@timestamp", "ecs.version", "event.kind", "event.action", "event.outcome",
          "event.category", "event.type", "event.sequence", "event.hash", "service.name"}
PEER = {"source.ip", "source.port", "tls.version", "service.node.name"}
REQUEST = PEER | {"http.request.id", "http.request.method", "url.path",
                  "http.response.status_code"}
LAB = Lab(None)


def type_problem(ecs_type: str, value: Any) -> str | None:
    """Why ``value`` cannot be indexed as an ECS field of ``ecs_type``, or None."""
    if ecs_type in STRINGS:
        return None if isinstance(value, str) else "not a string"
    if ecs_type in INTEGERS:
        bits = INTEGERS[ecs_type]
        ok = isinstance(value, int) and not isinstance(value, bool) and \
            -(1 << bits) <= value < (1 << bits)
        return None if ok else f"not a {ecs_type}"
    if ecs_type == "ip":
        try:
            ipaddress.ip_address(value)
        except (TypeError, ValueError):
            return "not an IP address"
        return None
    if ecs_type == "date":
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except (AttributeError, ValueError):
            return "not an ISO 8601 date"
        return None if value.endswith("Z") else "not UTC"
    if ecs_type == "boolean":
        return None if isinstance(value, bool) else "not a boolean"
    return f"type {ecs_type} not handled by this test"


def ecs_problems(event: dict[str, Any]) -> list[str]:
    """Every way ``event`` departs from the ECS reference (empty: it conforms)."""
    out = [f"{k}: missing" for k in sorted(ALWAYS - set(event))]
    for key, value in event.items():
        if key.startswith("fedgate."):
            continue
        if key in LEGACY_ALIASES:  # a pre-v1.1 name: same value as its new name, if any
            new = LEGACY_ALIASES[key]
            if new in event and event[new] != value:
                out.append(f"{key}: alias differs from {new}")
            if new not in event and value is not None and key != "request_id":
                out.append(f"{key}: alias without {new}")
            continue
        spec = FIELDS.get(key)
        if spec is None:
            out.append(f"{key}: not an ECS {ECS_VERSION} field")
            continue
        values = value if "array" in spec["normalize"] else [value]
        if "array" in spec["normalize"] and not (isinstance(value, list) and value):
            out.append(f"{key}: ECS normalises it to an array")
        out += [f"{key}: {p}" for v in values if (p := type_problem(spec["type"], v))]
    if event.get("ecs.version") != REFERENCE["_about"]["ecs_version"]:
        out.append(f"ecs.version {event.get('ecs.version')!r} is not the reference's")
    for name in ("event.kind", "event.outcome"):
        if event.get(name) not in ALLOWED[name]:
            out.append(f"{name} {event.get(name)!r} not allowed")
    categories, types = event.get("event.category", []), event.get("event.type", [])
    out += [f"event.category {c!r} not allowed" for c in categories
            if c not in ALLOWED["event.category"]]
    out += [f"event.type {t!r} not allowed" for t in types if t not in ALLOWED["event.type"]]
    expected = {c: set(ALLOWED["event.category"].get(c) or ()) for c in categories}
    out += [f"event.type {t!r} expected by none of {categories}" for t in types
            if not any(t in e for e in expected.values())]
    out += [f"event.category {c!r} has none of its types {sorted(e)}"
            for c, e in expected.items() if not e & set(types)]
    return out


def events_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- the checker itself, and fedgate's own tables against the reference --------------------

def test_the_vendored_reference_is_ecs_8_11_and_holds_every_field_the_code_names() -> None:
    assert REFERENCE["_about"]["ecs_version"] == ECS_VERSION == "8.11.0"
    assert "Apache" in REFERENCE["_about"]["license"]
    for category, types in EXPECTED_TYPES.items():  # audit/ecs.py copied the right table
        assert set(ALLOWED["event.category"][category]) == types, category
    assert set(LEGACY_ALIASES.values()) - set(FIELDS) == {
        v for v in LEGACY_ALIASES.values() if v.startswith("fedgate.")}


CHECKER_CASES = [  # (what, change to a conforming event, the problem it must report)
    ("unknown field", {"service.identity2": "x"}, "not an ECS 8.11.0 field"),
    ("string as long", {"source.port": "443"}, "source.port: not a long"),
    ("bool as long", {"event.sequence": True}, "event.sequence: not a long"),
    ("bad ip", {"source.ip": "localhost"}, "source.ip: not an IP address"),
    ("type not allowed", {"event.type": ["denied"]}, "expected by none"),
    ("category without its type", {"event.category": ["web", "iam"]}, "'iam' has none"),
    ("kind alert", {"event.kind": "alerts"}, "event.kind 'alerts' not allowed"),
    ("outcome", {"event.outcome": "ok"}, "event.outcome 'ok' not allowed"),
    ("alias differs", {"tenant_id": "other"}, "tenant_id: alias differs"),
    ("category scalar", {"event.category": "web"}, "normalises it to an array"),
    ("old ecs", {"ecs.version": "1.6.0"}, "is not the reference's"),
]


@pytest.mark.parametrize(("change", "problem"), [c[1:] for c in CHECKER_CASES],
                         ids=[c[0] for c in CHECKER_CASES])
def test_the_checker_catches_each_kind_of_departure(change: dict, problem: str) -> None:
    good = {"@timestamp": "2026-11-23T14:52:49.163Z", "ecs.version": "8.11.0",
            "event.kind": "event", "event.action": "telemetry.accepted",
            "event.outcome": "success", "event.category": ["web"], "event.type": ["access"],
            "event.sequence": 1, "event.hash": "ab" * 32, "service.name": "fedgate",
            "source.ip": "127.0.0.1", "source.port": 4433, "organization.id": "t",
            "tenant_id": "t"}
    assert ecs_problems(good) == []
    assert any(problem in p for p in ecs_problems({**good, **change})), ecs_problems(
        {**good, **change})


def test_each_emitter_verdict_conforms() -> None:
    """The emitter's events, one per §6 code (the builder, as the emitter calls it)."""
    events = [feedback_event(outcome="success", request_id="r", status=200, tenant_id=TENANT,
                             kid="vv", nonce="n.s", adjustments=1, skipped=["4a" * 32],
                             method="POST", path=QUERY_PATH, node="host-1", now=NOW)]
    events += [feedback_event(outcome="failure", reason=code, request_id="r", status=200,
                              method="POST", path=QUERY_PATH, node="host-1", now=NOW)
               for code in FEEDBACK_CATEGORIES]
    for event in events:
        chained = {**event, "event.sequence": 1, "event.hash": "ab" * 32}
        assert ecs_problems(chained) == [], (event.get("event.reason", "applied"),
                                             ecs_problems(chained))


# -- a real gateway -------------------------------------------------------------------------

async def post(client, stack: Stack, path: str, headers: dict, body: bytes) -> int:
    async with client.post(stack.url + path, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def not_http(stack: Stack) -> bytes:
    """Bytes that are not HTTP over a good mTLS connection: aiohttp's own refusal."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port, ssl=stack.ssl())
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    data = await reader.read(4096)
    writer.close()
    return data


async def refused_handshake(stack: Stack) -> None:
    """A client without a certificate, from 127.0.0.2: the gateway refuses the handshake."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", stack.port, ssl=stack.ssl(None), local_addr=("127.0.0.2", 0))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.read(64), 10)
        writer.close()
    except (ssl.SSLError, OSError):
        pass


async def until(predicate, what: str) -> None:
    """A functional deadline (the handshake's event is written a loop turn later)."""
    for _ in range(300):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def test_every_kind_of_gateway_event_conforms_to_ecs(tmp_path, sqlite_url) -> None:
    from gateway.http.app import STORE
    stack = Stack(tmp_path, sqlite_url, server={"node_name": "gw-east-1"})
    async with stack.running(clock=lambda: NOW) as runner, stack.session() as client:
        assert await post(client, stack, TELEMETRY_PATH, *LAB.signed()) == 202
        assert await post(client, stack, GRAPH_PATH, *LAB.signed(GRAPH_PATH)) == 202
        assert await post(client, stack, QUERY_PATH, *LAB.signed(QUERY_PATH)) == 200
        bad_sig = LAB.signed()[1].replace(b"ws-17", b"ws-18")
        assert await post(client, stack, TELEMETRY_PATH, LAB.signed()[0], bad_sig) == 401
        assert await post(client, stack, TELEMETRY_PATH, *LAB.signed(body=body_for(
            TELEMETRY_PATH, operator_id="op-002", signed_metadata={
                "campaign_id": "cmp-001", "operator_id": "op-002", "tenant_id": TENANT}))) == 403
        assert await post(client, stack, TELEMETRY_PATH,
                          *raw_signed(b'{"b":1, "a":2}')) == 422
        store = runner.app[STORE]  # a real SQLITE_FULL: 503 store_unavailable (database)
        store._db.execute(f"PRAGMA max_page_count = "
                          f"{store._db.execute('PRAGMA page_count').fetchone()[0]}")
        big = body_for(TELEMETRY_PATH)
        big["payload"] = {**big["payload"], "description": "x" * 20000}
        assert await post(client, stack, TELEMETRY_PATH, *LAB.signed(body=big)) == 503
        store._db.execute("PRAGMA max_page_count = 1073741823")
        async with client.get(stack.url + "/v1/nothing-here?x=1") as resp:
            assert resp.status == 404
        assert b" 400 Bad Request" in (await not_http(stack)).split(b"\r\n")[0]
        await refused_handshake(stack)
        await until(lambda: any(e["event.action"] == "tls.handshake_failed"
                                for e in events_of(stack.audit_path)), "handshake event")
        await until(lambda: any(e["event.action"] == "http.rejected"
                                for e in events_of(stack.audit_path)), "http.rejected event")
    events = events_of(stack.audit_path)
    assert verify_file(stack.audit_path).ok
    by = {(e["event.action"], e.get("event.reason")): e for e in events}
    assert set(by) == {
        ("telemetry.accepted", None), ("graph.accepted", None), ("feedback.issued", None),
        ("telemetry.rejected", "invalid_signature"), ("telemetry.rejected", "mapping_violation"),
        ("telemetry.rejected", "non_canonical_body"), ("telemetry.rejected", "store_unavailable"),
        ("http.rejected", "not_found"), ("http.rejected", "bad_request"),
        ("tls.handshake_failed", "no_client_certificate")}, sorted(by)
    validators = Validators()
    for key, event in by.items():
        assert ecs_problems(event) == [], (key, ecs_problems(event))
        validators.validate("audit_event", event)
        assert event["service.name"] == "fedgate"
        assert event["service.node.name"] == "gw-east-1"
        assert event["event.hash"] == event["hash"]
        assert event["fedgate.prev_hash"] == event["prev_hash"]
    for key in by:  # a decision on an HTTP request: the whole request's ECS block
        if key[1] != "bad_request" and key[0] != "tls.handshake_failed":
            event = by[key]
            assert not REQUEST - set(event), (key, REQUEST - set(event))
            assert (event["source.ip"], event["tls.version"], event["tls.version_protocol"]) == (
                "127.0.0.1", "1.3", "tls")
            assert event["http.request.id"] == event["request_id"]
            assert event["http.request.method"] == ("GET" if key[1] == "not_found" else "POST")
    assert by[("http.rejected", "not_found")]["url.path"] == "/v1/nothing-here"  # no query
    assert by[("telemetry.accepted", None)]["url.path"] == TELEMETRY_PATH
    assert not PEER - set(by[("http.rejected", "bad_request")])  # no request line to tell
    handshake = by[("tls.handshake_failed", "no_client_certificate")]
    assert handshake["source.ip"] == "127.0.0.2"
    assert {"http.request.method", "url.path", "http.request.id"}.isdisjoint(handshake)
    assert handshake["event.type"] == ["connection", "denied", "start"]
    accepted = by[("telemetry.accepted", None)]
    assert accepted["organization.id"] == accepted["tenant_id"] == TENANT
    assert accepted["fedgate.service_identity"] == accepted["service.identity"] == IDENTITY
    assert accepted["fedgate.kid"] == accepted["kid"] == "lab-2026"
    assert accepted["event.type"] == ["access"]
    assert by[("telemetry.rejected", "invalid_signature")]["event.type"] == ["start"]
    assert by[("telemetry.rejected", "mapping_violation")]["event.type"] == ["info"]
    assert by[("telemetry.rejected", "store_unavailable")]["event.category"] == ["database"]
    assert by[("telemetry.rejected", "store_unavailable")]["event.type"] == ["error"]


# -- a real emitter -------------------------------------------------------------------------

def emitter_config(stack: Stack) -> Path:
    root = stack.root / "emitter"
    root.mkdir()
    (root / "producer.pem").write_bytes(PRODUCER.to_pem())
    save_jwks(root / "feedback.jwks.json",
              Keyring([Key("vv-fb-2026", PrivateKey(FEEDBACK_SEED).public)]))
    ident = stack.pki.identities[IDENTITY]
    values = {"url": stack.url, "ca": str(stack.pki.ca.cert), "cert": str(ident.cert),
              "key": str(ident.key), "server_pins": [stack.pki.gateway.sha256],
              "identity": IDENTITY, "signing_key": "producer.pem", "kid": "lab-2026",
              "feedback_keyring": "feedback.jwks.json", "state_dir": "state",
              "max_attempts": 2, "request_timeout_s": 5}
    path = root / "emitter.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


async def test_the_emitters_feedback_event_conforms_to_ecs(tmp_path, sqlite_url) -> None:
    stack = Stack(tmp_path, sqlite_url)
    async with stack.running():
        client = EmitterClient(load_emitter_settings(emitter_config(stack)))
        async with client:
            await client.query_feedback(TENANT, "op-001")
            path = client.settings.state_dir / "emitter-audit.jsonl"
    (event,) = events_of(path)
    assert verify_file(path).ok
    assert ecs_problems(event) == [], ecs_problems(event)
    assert (event["event.action"], event["service.name"], event["service.node.name"]) == (
        "feedback.applied", "fedgate-emitter", socket.gethostname())
    assert (event["http.request.method"], event["url.path"]) == ("POST", QUERY_PATH)
    assert event["http.request.id"] == event["request_id"]
    assert event["organization.id"] == TENANT
    assert event["fedgate.kid"] == "vv-fb-2026"
    assert not {"source.ip", "source.port", "tls.version"} & set(event)  # see feedback_event
