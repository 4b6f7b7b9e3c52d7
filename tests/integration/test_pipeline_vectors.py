"""Every telemetry_v1 vector and the interop captures, through the pipeline, on both stores.

Status AND error code are asserted; a rejected request must leave no state behind (no
nonce claimed, no record written).
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from conftest import load_vectors
from multidict import CIMultiDict

from gateway.config.config import SecurityConfig
from gateway.pipeline import errors as E
from gateway.pipeline.pipeline import Pipeline
from gateway.pipeline.request import Context, SignedRequest
from keyring import Key, Keyring, parse_jwks
from schemas.routes import SIGNED_ROUTES
from schemas.validate import Validators

TELEMETRY = load_vectors("telemetry_v1.json")
CASES = {case["name"]: case for case in TELEMETRY["cases"]}
EXPECTED_NAMES = 46
VALIDATORS = Validators()


def test_vector_set_is_complete():
    assert len(CASES) == EXPECTED_NAMES == len(TELEMETRY["cases"])
    assert {c["expect"]["status"] for c in CASES.values()} == {202, 401, 403, 409, 415, 422}


def vector_pipeline(store) -> Pipeline:
    config = SecurityConfig.from_mapping(TELEMETRY["config"])
    return Pipeline(config, parse_jwks(TELEMETRY["keyring"]), VALIDATORS, store)


async def send(pipeline: Pipeline, headers, body: bytes, path: str, peer: str | None, now: int):
    """One request through the pipeline → (status, error code, ctx or error)."""
    request_id = str(uuid.uuid4())
    req = SignedRequest(SIGNED_ROUTES[path], CIMultiDict(headers), body, peer, request_id)
    ctx = Context(request_id)
    try:
        await pipeline.process(req, now, ctx)
    except E.GatewayError as exc:
        return exc.status, exc.error, exc
    return 202, None, ctx


async def send_case(pipeline: Pipeline, case: dict):
    body = base64.b64decode(case["body_b64"])
    return await send(pipeline, case["headers"], body, case["path"],
                      case["peer_cert_sha256"], case["now"])


async def assert_nothing_written(store, case: dict) -> None:
    headers = CIMultiDict(case["headers"])
    tenants = set(TELEMETRY["config"]["operator_tenants"].values())
    for identity in TELEMETRY["config"]["identities"]:
        nonce = headers.get("X-Telemetry-Nonce", "")
        for tenant in tenants:
            assert not await store.is_claimed(identity, tenant, nonce, case["now"])
    for tenant in tenants:
        for kind in ("finding", "graph", "feedback"):
            assert await store.list_records(kind, tenant) == []


def chain(case: dict) -> list[str]:
    """The cases ``case`` comes after, oldest first (``after`` may itself have one)."""
    names = []
    while (name := case.get("after")) is not None:
        assert name not in names, f"an `after` cycle through {name}"
        names.append(name)
        case = CASES[name]
    return names[::-1]


def test_after_chains_resolve():
    assert chain(CASES["reject_execution_not_owned"]) == [
        "accept_basic", "accept_same_nonce_other_tenant"]


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_telemetry_vector(store, case):
    pipeline = vector_pipeline(store)
    prior = None
    for name in chain(case):  # the `after` chain, oldest first, each accepted
        status, error, prior = await send_case(pipeline, CASES[name])
        assert (status, error) == (202, None), name
    status, error, outcome = await send_case(pipeline, case)
    assert (status, error) == (case["expect"]["status"], case["expect"]["error"])
    if status == 202:
        record = json.loads(await store.get_record("finding", outcome.record_id,
                                                   outcome.tenant_id))
        assert base64.b64decode(record["body_b64"]) == base64.b64decode(case["body_b64"])
        assert record["peer_cert_sha256"] == case["peer_cert_sha256"]
    elif prior is None:
        await assert_nothing_written(store, case)
    if case["expect"].get("duplicate_of_accepted"):
        assert outcome.extra["duplicate_of"] == prior.request_id


# -- interop: the real producer's bytes ------------------------------------------------

INTEROP = {name: load_vectors(f"interop/{name}.json")
           for name in ("telemetry_01", "telemetry_02", "telemetry_03", "replay_01",
                        "feedback_01", "feedback_02")}
GRAPHS = load_vectors("interop/execution_graph_requests.json")
CONTEXT = load_vectors("interop/context.json")
TENANT = "10000000-0000-0000-0000-000000000001"


def interop_pipeline(store) -> Pipeline:
    config = SecurityConfig.from_mapping({
        "identities": {"spectrastrike-producer": {
            "pins": [CONTEXT["client_cert_sha256"]], "tenants": [TENANT]}},
        "operator_tenants": {"op-001": TENANT},
    })
    key = Key(kid="ss-interop", public=base64.b64decode(CONTEXT["producer_public_key_b64"]),
              identity="spectrastrike-producer", tenants=frozenset({TENANT}))
    return Pipeline(config, Keyring([key]), VALIDATORS, store)


async def send_interop(pipeline: Pipeline, request: dict, now: int):
    body = base64.b64decode(request["body_b64"])
    return await send(pipeline, request["headers"], body, request["path"],
                      CONTEXT["client_cert_sha256"], now)


async def test_interop_capture_in_wire_order(store):
    """The capture's order on one connection: 3 telemetry, 2 graphs, 2 queries, replay."""
    pipeline = interop_pipeline(store)
    now = INTEROP["telemetry_01"]["captured_at_unix"]
    accepted = {}
    for name in ("telemetry_01", "telemetry_02", "telemetry_03"):
        status, error, ctx = await send_interop(pipeline, INTEROP[name]["request"], now)
        assert (status, error) == (202, None), name
        accepted[name] = ctx
        assert ctx.attestation_hash == ctx.body["payload"]["attributes"][
            "attestation_measurement_hash"]
    for graph in GRAPHS:
        status, error, _ = await send_interop(pipeline, graph["request"], now)
        assert (status, error) == (202, None), graph["vector_id"]
    for name in ("feedback_01", "feedback_02"):
        status, error, _ = await send_interop(pipeline, INTEROP[name]["query_request"], now)
        assert (status, error) == (202, None), name
    replay = INTEROP["replay_01"]["request"]
    assert replay["body_b64"] == INTEROP["telemetry_01"]["request"]["body_b64"]
    status, error, exc = await send_interop(pipeline, replay, now)
    assert (status, error) == (409, "replayed_nonce")
    assert exc.extra["duplicate_of"] == accepted["telemetry_01"].request_id
    assert len(await store.list_records("finding", TENANT)) == 3
    assert len(await store.list_records("graph", TENANT)) == 2
