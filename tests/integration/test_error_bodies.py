"""PROTOCOL.md §4 v1.1 error bodies, on the wire, for every code the gateway can answer.

The set of codes comes from the code (``gateway.pipeline.errors.ALL_ERRORS`` and the router's
``ROUTER_CODES``), not from a list kept here: a new code without a scenario below fails
``test_every_wire_code_has_a_scenario``. Each scenario drives a real in-process gateway
over mTLS (the project's dev PKI, a real SQLite file) into that refusal; the body must
carry ``status: "rejected"`` and ``errors[0] == {"code": error, "message": detail}``,
which is what the SpectraStrike client reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from lab import (
    ATT_OTHER,
    IDENTITY,
    KEYS,
    NOW,
    TENANT,
    TENANT_B,
    Lab,
    body_for,
    raw_signed,
)
from stack import Stack, toml_value

from gateway.http.app import ROUTER_CODES, STORE
from gateway.pipeline import errors as E
from keyring import Key, Keyring, PrivateKey
from keyring.keys import save_jwks
from schemas.canonical import dumps
from schemas.routes import GRAPH_PATH, TELEMETRY_PATH

OTHER = "spectrastrike-other"
OTHER_KEY = PrivateKey(hashlib.sha256(b"error bodies: the other identity's key").digest())
LAB = Lab(None)

WIRE_CODES: dict[str, int] = {cls.error: cls.status for cls in E.ALL_ERRORS}
WIRE_CODES.update({code: status for status, code in ROUTER_CODES.items()})


@dataclass
class Env:
    stack: Stack
    runner: Any
    monkeypatch: pytest.MonkeyPatch
    notes: dict[str, Any] = field(default_factory=dict)

    async def post(self, path: str, headers: dict, body: Any, identity: str = IDENTITY):
        async with self.stack.session(identity) as client, client.post(
                self.stack.url + path, data=body, headers=headers) as resp:
            return resp.status, resp.headers.copy(), await resp.json()

    async def get(self, path: str):
        async with self.stack.session() as client, client.get(self.stack.url + path) as resp:
            return resp.status, resp.headers.copy(), await resp.json()



def signed(**kw) -> tuple[dict, bytes]:
    return LAB.signed(**kw)


async def accepted_first(env: Env, path: str = TELEMETRY_PATH, **kw) -> None:
    status, _, payload = await env.post(path, *LAB.signed(path, **kw))
    assert status == 202, payload


# -- scenarios: each returns the refusal's (status, headers, body) -------------------------
Scenario = Callable[[Env], Awaitable[tuple[int, dict, dict]]]


async def replayed(env: Env):
    headers, body = signed()
    await env.post(TELEMETRY_PATH, headers, body)
    return await env.post(TELEMETRY_PATH, headers, body)


async def rate_limited(env: Env):
    await accepted_first(env)
    return await env.post(TELEMETRY_PATH, *signed())


async def attestation_mismatch(env: Env):
    await accepted_first(env)
    graph = body_for(GRAPH_PATH, attestation_measurement_hash=ATT_OTHER)
    return await env.post(GRAPH_PATH, *LAB.signed(GRAPH_PATH, body=graph))


async def execution_not_owned(env: Env):
    """The producer anchors the execution; another identity, allowed in the same tenant
    with its own key, sends a graph for it (same attestation hash)."""
    await accepted_first(env)
    headers, body = LAB.signed(GRAPH_PATH, key=OTHER_KEY, kid="other-2026")
    return await env.post(GRAPH_PATH, {**headers, "X-Service-Identity": OTHER}, body,
                          identity=OTHER)


async def replay_store_unavailable(env: Env):
    """Another connection holds SQLite's write lock past busy_timeout_ms."""
    blocker = sqlite3.connect(env.stack.store_url.removeprefix("sqlite:///"),
                              isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        return await env.post(TELEMETRY_PATH, *signed())
    finally:
        blocker.close()


async def store_unavailable(env: Env):
    """A real SQLITE_FULL inside the gateway's own store."""
    await accepted_first(env)
    db = env.runner.app[STORE]._db
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    big = body_for(TELEMETRY_PATH)
    big["payload"] = {**big["payload"], "description": "x" * 20000}
    return await env.post(TELEMETRY_PATH, *signed(body=big))


async def request_timeout(env: Env):
    headers, body = signed()

    async def stall():
        yield body[:10]
        await asyncio.sleep(1.5)  # past the 1 s body deadline (clock_skew_s = 1)
        yield body[10:]

    return await env.post(TELEMETRY_PATH, headers, stall())


async def audit_unavailable(env: Env):
    await accepted_first(env)
    with env.stack.audit_path.open("a") as fh:
        fh.write('{"torn')
    # the first append to find it broken follows an accepted commit: that 202 stands
    # (its event is in the store's audit outbox); the next request is refused
    status, _, _ = await env.post(TELEMETRY_PATH, *signed())
    assert status == 202
    return await env.post(TELEMETRY_PATH, *signed())


async def internal_error(env: Env):
    """FAKE FAULT (cannot be produced for real): the pipeline raises unexpectedly."""
    from gateway.pipeline.pipeline import Pipeline

    async def boom(self, req, now, ctx):
        raise RuntimeError("unexpected")

    env.monkeypatch.setattr(Pipeline, "process", boom)
    return await env.post(TELEMETRY_PATH, *signed())


async def unparseable(env: Env):
    """HTTP aiohttp's parser refuses (gateway/http/http_errors.py), on a raw TLS socket."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", env.stack.port, ssl=env.stack.ssl(), server_hostname="localhost")
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, json.loads(body)


def post_(build: Callable[[], tuple[str, dict, bytes]], identity: str = IDENTITY) -> Scenario:
    async def run(env: Env):
        path, headers, body = build()
        return await env.post(path, headers, body, identity)
    return run


def get_(path: str) -> Scenario:
    async def run(env: Env):
        return await env.get(path)
    return run


T = TELEMETRY_PATH
SCENARIOS: dict[str, Scenario] = {
    "not_found": get_("/internal/v1/nothing"),
    "method_not_allowed": get_(TELEMETRY_PATH),
    "unsupported_media_type": post_(
        lambda: (T, {**signed()[0], "Content-Type": "text/plain"}, signed()[1])),
    "body_too_large": post_(lambda: (T, signed()[0], b"x" * (1024 * 1024 + 1))),
    "empty_body": post_(lambda: (T, signed()[0], b"")),
    "identity_rejected": post_(lambda: (T, *signed()), identity=OTHER),
    "malformed_signature_headers": post_(
        lambda: (T, {**signed()[0], "X-Telemetry-Signature": "AAAA"}, signed()[1])),
    "timestamp_out_of_window": post_(lambda: (T, *signed(ts=NOW - 31))),
    "unknown_kid": post_(lambda: (T, *signed(kid="nope"))),
    "key_not_valid": post_(lambda: (T, *signed(kid="lab-revoked"))),
    "invalid_signature": post_(
        lambda: (T, signed()[0], signed()[1].replace(b"ws-17", b"ws-18"))),
    "malformed_json": post_(lambda: (T, *raw_signed(b'{"a":1,"a":2}'))),
    "non_canonical_body": post_(lambda: (T, *raw_signed(b'{"b":1, "a":2}'))),
    "schema_violation": post_(lambda: (T, *signed(body=body_for(T, extra=1)))),
    "header_body_mismatch": post_(lambda: (T, *raw_signed(dumps(
        {**body_for(T), "timestamp": NOW - 1, "nonce": "nonce-raw-0001"})))),
    "mapping_violation": post_(lambda: (T, *signed(body=body_for(
        T, operator_id="op-002", signed_metadata={
            "campaign_id": "cmp-001", "operator_id": "op-002", "tenant_id": TENANT})))),
    "schema_version_not_allowed": post_(lambda: (GRAPH_PATH, *LAB.signed(
        GRAPH_PATH, body=body_for(GRAPH_PATH, schema_version="execution.graph.v9")))),
    "rate_limited": rate_limited,
    "attestation_mismatch": attestation_mismatch,
    "execution_not_owned": execution_not_owned,
    "replayed_nonce": replayed,
    "replay_store_unavailable": replay_store_unavailable,
    "store_unavailable": store_unavailable,
    "request_timeout": request_timeout,
    "audit_unavailable": audit_unavailable,
    "internal_error": internal_error,
    "bad_request": unparseable,
}
SECURITY = {"rate_limited": {"rate_limit_per_minute": 1},
            "request_timeout": {"clock_skew_s": 1, "nonce_ttl_s": 3}}
EXTRA = {"schema_violation": "pointer", "replayed_nonce": "duplicate_of",
         "rate_limited": "retry_after"}  # extra members that must survive beside errors


def build_stack(root, code: str) -> Stack:
    stack = Stack(root, f"sqlite:///{root / 'fedgate.db'}", **SECURITY.get(code, {}))
    text = stack.config_path.read_text()
    if code == "replay_store_unavailable":
        url = f"url = {toml_value(stack.store_url)}"
        text = text.replace(url, url + "\nbusy_timeout_ms = 100")
    if code == "execution_not_owned":  # the other identity may also send for TENANT
        text = text.replace(f"tenants = {toml_value([TENANT_B])}",
                            f"tenants = {toml_value([TENANT_B, TENANT])}")
        save_jwks(root / "keys" / "producers.jwks.json", Keyring([
            *KEYS.values(), Key("other-2026", OTHER_KEY.public, identity=OTHER,
                                tenants=frozenset({TENANT}))]))
    stack.config_path.write_text(text)
    return stack


def test_every_wire_code_has_a_scenario():
    assert set(WIRE_CODES) - set(SCENARIOS) == set()


@pytest.mark.parametrize("code", sorted(set(WIRE_CODES) & set(SCENARIOS)))
async def test_error_body_on_the_wire(tmp_path, monkeypatch, code):
    stack = build_stack(tmp_path, code)
    async with stack.running(clock=lambda: NOW) as runner:
        status, headers, body = await SCENARIOS[code](Env(stack, runner, monkeypatch))
    assert (status, body["error"]) == (WIRE_CODES[code], code), body
    assert body["accepted"] is False
    assert body["status"] == "rejected"
    assert body["request_id"] == headers["X-Request-Id"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["errors"] == [{"code": code, "message": body["detail"]}]
    assert body["errors"][0]["code"] == body["error"]
    if code in EXTRA:
        assert EXTRA[code] in body
