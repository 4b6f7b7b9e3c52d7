"""Protocol v1.1 store rules on the wire, through the running gateway (both stores):
executions owned by the identity that anchored them (§5), and a replayed feedback query
refused before its answer is computed (§4.13)."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from lab import FP, IDENTITY, KEYS, NOW, PRODUCER, TENANT, body_for
from stack import Stack

from emitter.signing import sign_request
from gateway.feedback.policy import DEFAULT_RULES_FILE
from gateway.http.app import ISSUER
from keyring import Key, Keyring, PrivateKey
from schemas.routes import GRAPH_PATH, QUERY_PATH, TELEMETRY_PATH

OTHER = "spectrastrike-other"
OTHER_KEY = PrivateKey(hashlib.sha256(b"lab producer key, other identity").digest())
FP_OTHER = "7" * 64


def signed(path: str, body: dict, *, identity: str = IDENTITY, nonce: str | None = None):
    key, kid = (PRODUCER, "lab-2026") if identity == IDENTITY else (OTHER_KEY, "lab-other")
    s = sign_request(key, body, identity=identity, kid=kid, timestamp=NOW,
                     nonce=nonce or uuid.uuid4().hex)
    return dict(s.headers), s.body


async def post(stack: Stack, path: str, headers: dict, body: bytes, identity: str = IDENTITY):
    async with (stack.session(identity) as client,
                client.post(stack.url + path, data=body, headers=headers) as resp):
        return resp.status, await resp.json()


def telemetry(fp: str) -> dict:
    body = body_for(TELEMETRY_PATH, execution_hash=fp)
    body["payload"] = {**body["payload"], "attributes": {
        **body["payload"]["attributes"], "execution_fingerprint": fp}}
    return body


@pytest.fixture
async def shared_tenant(tmp_path, store_url):
    """Both identities may send for TENANT, each with its own key."""
    keys = Keyring([*(KEYS[kid] for kid in KEYS), Key("lab-other", OTHER_KEY.public, identity=OTHER,
                               tenants=frozenset({TENANT}))])
    st = Stack(tmp_path, store_url, tenants={IDENTITY: [TENANT], OTHER: [TENANT]}, keys=keys)
    async with st.running(clock=lambda: NOW):
        yield st


async def test_another_identity_cannot_send_for_an_owned_execution(shared_tenant):
    st = shared_tenant
    status, _ = await post(st, TELEMETRY_PATH, *signed(TELEMETRY_PATH, telemetry(FP)))
    assert status == 202
    for path, body in ((TELEMETRY_PATH, telemetry(FP)), (GRAPH_PATH, body_for(GRAPH_PATH))):
        status, payload = await post(st, path, *signed(path, body, identity=OTHER), OTHER)
        assert (status, payload["error"]) == (403, "execution_not_owned"), path
    # B anchors its own execution; then A is the stranger there
    status, _ = await post(st, TELEMETRY_PATH,
                           *signed(TELEMETRY_PATH, telemetry(FP_OTHER), identity=OTHER), OTHER)
    assert status == 202
    status, payload = await post(st, TELEMETRY_PATH, *signed(TELEMETRY_PATH, telemetry(FP_OTHER)))
    assert (status, payload["error"]) == (403, "execution_not_owned")
    events = [json.loads(line) for line in st.audit_path.read_text().splitlines()]
    refused = [e for e in events if e.get("event.reason") == "execution_not_owned"]
    assert [e["http.response.status_code"] for e in refused] == [403, 403, 403]


@pytest.fixture
async def with_policy(tmp_path, store_url):
    st = Stack(tmp_path, store_url, policy_rules=DEFAULT_RULES_FILE)
    async with st.running(clock=lambda: NOW) as runner:
        issuer = runner.app[ISSUER]
        real, calls = issuer.policy, []

        async def counted(*args, **kwargs):  # the real rule policy, counted
            calls.append(args[1:])
            return await real(*args, **kwargs)

        issuer.policy = counted
        yield st, calls


async def test_replayed_query_is_refused_before_its_answer_is_computed(with_policy):
    st, calls = with_policy
    assert (await post(st, TELEMETRY_PATH, *signed(TELEMETRY_PATH, telemetry(FP))))[0] == 202
    headers, body = signed(QUERY_PATH, body_for(QUERY_PATH), nonce="query-nonce-0001")
    status, first = await post(st, QUERY_PATH, headers, body)
    assert status == 200 and len(calls) == 1
    status, again = await post(st, QUERY_PATH, headers, body)
    assert (status, again["error"], again["duplicate_of"]) == (
        409, "replayed_nonce", first["request_id"])
    other = signed(QUERY_PATH, body_for(QUERY_PATH, limit=5), nonce="query-nonce-0001")
    status, changed = await post(st, QUERY_PATH, *other)
    assert (status, changed["error"]) == (409, "replayed_nonce")
    assert "duplicate_of" not in changed
    assert len(calls) == 1  # neither replay reached the policy
