"""schemas/*.schema.json and schemas/validate.py: every case is judged by BOTH engines.

The hot path (jsonschema_rs) and the reference (python jsonschema) must each give the
expected verdict, so they agree with each other and with PROTOCOL.md sections 5 and 7.
Bases are real bodies (interop captures, vectors); cases mutate them.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.validate import (
    SCHEMA_NAMES,
    ReferenceValidators,
    SchemaError,
    Validators,
    json_pointer,
    load_schema,
)

VECTORS = Path(__file__).resolve().parents[2] / "tests" / "vectors"
HOT, REF = Validators(), ReferenceValidators()
ENGINES = pytest.mark.parametrize("engine", [HOT, REF], ids=["hot", "reference"])


def _load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def _body(b64: str) -> Any:
    return json.loads(base64.b64decode(b64))


_T01 = _load("interop/telemetry_01.json")
_FB_OK = [c for c in _load("feedback_v1.json")["cases"] if c["expect"] == "ok"]
_RESPONSE = _FB_OK[0]["response"]
_RAW = base64.b64decode(_T01["request"]["body_b64"])
_HDR = dict(_T01["request"]["headers"])
HEX = "ab" * 32
BASES: dict[str, Any] = {
    "telemetry": _body(_T01["request"]["body_b64"]),
    "execution_graph": _body(
        _load("interop/execution_graph_requests.json")[0]["request"]["body_b64"]),
    "feedback_query": _body(_load("interop/feedback_01.json")["query_request"]["body_b64"]),
    "feedback_response": _RESPONSE,
    "adjustment": _RESPONSE["data"][0],
    "finding_record": {
        "finding_id": "5f0c6d1e-8a4b-4c39-9d3e-2b7f1a6c0e11", "request_id": "req-0001",
        "received_at": _T01["captured_at_unix"], "identity": _T01["service_identity"],
        "peer_cert_sha256": _T01["client_cert_sha256"], "kid": "ss-a-2026",
        "signature": _HDR["X-Telemetry-Signature"], "timestamp": 1795445569,
        "nonce": _HDR["X-Telemetry-Nonce"], "tenant_id": "10000000-0000-0000-0000-000000000001",
        "operator_id": "op-001", "campaign_id": "cmp-local", "execution_fingerprint": "4a" * 32,
        "attestation_measurement_hash": "74" * 32,
        "body_sha256": hashlib.sha256(_RAW).hexdigest(),
        "body_b64": _T01["request"]["body_b64"], "schema_version": "finding.record.v1",
    },
    "audit_event": {
        "@timestamp": "2026-11-23T14:52:49.163896+00:00", "event.action": "telemetry.accepted",
        "event.outcome": "success", "event.category": "web", "http.response.status_code": 202,
        "request_id": "req-0001", "service.identity": "spectrastrike-producer",
        "tls.client.hash.sha256": _T01["client_cert_sha256"],
        "tenant_id": "10000000-0000-0000-0000-000000000001", "kid": None,
        "execution_fingerprint": "4a" * 32, "attestation_measurement_hash": "74" * 32,
        "prev_hash": "0" * 64, "hash": HEX, "ecs.version": "8.11.0", "event.kind": "event",
        "event.type": ["access"], "event.sequence": 1, "event.hash": HEX,
        "fedgate.prev_hash": "0" * 64, "service.name": "fedgate",
    },
}

# -- mutations: (path, value) sets, (path, DEL) deletes; a path is "a/b/0" -----------------
DEL = object()


def mutate(base: Any, changes: list[tuple[str, Any]]) -> Any:
    doc = copy.deepcopy(base)
    for path, value in changes:
        *parents, last = path.split("/")
        node = doc
        for part in parents:
            node = node[int(part) if isinstance(node, list) else part]
        key = int(last) if isinstance(node, list) else last
        if value is DEL:
            del node[key]
        else:
            node[key] = value
    return doc


def verdicts(name: str, instance: Any) -> tuple[bool, bool]:
    return HOT.is_valid(name, instance), REF.is_valid(name, instance)


# Explicit from PROTOCOL.md, not read back from the schema files.
REQUIRED = {
    "telemetry": "operator_id campaign_id tenant_id execution_hash timestamp nonce signed_metadata "
    "payload signed_metadata/tenant_id signed_metadata/operator_id signed_metadata/campaign_id "
    "payload/event_id payload/event_type payload/source_system payload/severity "
    "payload/observed_at payload/mitre_techniques payload/mitre_tactics payload/description "
    "payload/attributes payload/attributes/attestation_measurement_hash "
    "payload/attributes/schema_version",
    "execution_graph": "operator_id tenant_id execution_fingerprint timestamp nonce schema_version "
    "attestation_measurement_hash graph",
    "feedback_query": "operator_id tenant_id timestamp nonce",
    "adjustment": "tenant_id execution_fingerprint target_urn action confidence rationale control "
    "ttl_seconds timestamp schema_version attestation_measurement_hash",
    "feedback_response": "request_id status data errors signature kid signature_algorithm "
    "signed_at nonce schema_version",
    "finding_record": " ".join(BASES["finding_record"]),
    "audit_event": "@timestamp event.action event.outcome event.category request_id tenant_id kid "
    "execution_fingerprint prev_hash hash ecs.version event.kind event.type event.sequence "
    "event.hash fedgate.prev_hash service.name",  # [v1.1] §7 ECS alignment
}
OPTIONAL = {
    "telemetry": ["payload/attributes/execution_fingerprint", "payload/attributes/asset_ref"],
    "execution_graph": ["graph/nodes", "graph/edges", "graph/target_urn"],
    "feedback_query": ["limit"],
    "audit_event": ["http.response.status_code", "service.identity",
                    "tls.client.hash.sha256", "attestation_measurement_hash"],
}
CLOSED = {"telemetry": ["", "signed_metadata", "payload"], "execution_graph": [""],
          "feedback_query": [""], "adjustment": [""], "feedback_response": ["", "data/0"],
          "finding_record": [""]}
OPEN = {"telemetry": ["payload/attributes"], "execution_graph": ["graph"], "audit_event": [""]}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def _generated() -> list[tuple[str, str, list, bool]]:
    cases = [(f"{n}-base", n, [], True) for n in SCHEMA_NAMES]
    cases += [(f"{n}-missing-{p}", n, [(p, DEL)], False)
              for n, ps in REQUIRED.items() for p in ps.split()]
    cases += [(f"{n}-optional-{p}", n, [(p, DEL)], True) for n, ps in OPTIONAL.items() for p in ps]
    cases += [(f"{n}-extra-at-/{p}", n, [(_join(p, "x_extra"), 1)], False)
              for n, ps in CLOSED.items() for p in ps]
    cases += [(f"{n}-free-at-/{p}", n, [(_join(p, "x_extra"), {"any": [1, None]})], True)
              for n, ps in OPEN.items() for p in ps]
    return cases


TS = "payload/observed_at"
# (schema, case id, path, value, expected valid)
_SINGLE: list[tuple[str, str, str, Any, bool]] = [
    ("telemetry", f"operator_id-{n}", "operator_id", v, ok) for n, v, ok in [
        ("128", "o" * 128, True), ("129", "o" * 129, False), ("empty", "", False),
        ("128-astral", "\U0001f6a8" * 128, True), ("int", 1, False)]
] + [
    ("telemetry", n, p, v, ok) for n, p, v, ok in [
        ("campaign_id-129", "campaign_id", "c" * 129, False),
        ("meta-operator-empty", "signed_metadata/operator_id", "", False),
        ("meta-not-object", "signed_metadata", [], False),
        ("tenant-upper", "tenant_id", "ABCDEF00-0000-0000-0000-000000000001", True),
        ("tenant-35", "tenant_id", "0" * 35, False), ("tenant-g", "tenant_id", "g" * 36, False),
        ("tenant-newline", "tenant_id", "0" * 36 + "\n", False),
        ("hash-upper", "execution_hash", "AB" * 32, True),
        ("hash-63", "execution_hash", "a" * 63, False),
        ("hash-65", "execution_hash", "a" * 65, False),
        ("hash-nonhex", "execution_hash", "g" * 64, False),
        ("hash-newline", "execution_hash", HEX + "\n", False),
        ("hash-fullwidth", "execution_hash", "\uff11" * 64, False),
        ("ts-0", "timestamp", 0, True), ("ts-neg", "timestamp", -1, False),
        ("ts-bool", "timestamp", True, False), ("ts-string", "timestamp", "1795445569", False),
        ("ts-fraction", "timestamp", 1795445569.5, False),
        ("ts-integral-float", "timestamp", 1795445569.0, True),
        ("ts-year-9999", "timestamp", 253402300799, True),
        ("ts-after-9999", "timestamp", 253402300800, False),
        ("ts-huge", "timestamp", 10**40, False),
        ("nonce-7", "nonce", "n" * 7, False), ("nonce-8", "nonce", "n" * 8, True),
        ("nonce-128", "nonce", "n" * 128, True), ("nonce-129", "nonce", "n" * 129, False),
        ("nonce-pipe", "nonce", "bad|nonce|x", False),
        ("nonce-newline", "nonce", "n" * 8 + "\n", False),
        ("severity-HIGH", "payload/severity", "HIGH", False),
        ("severity-empty", "payload/severity", "", False),
        *[(f"severity-{s}", "payload/severity", s, True)
          for s in ("info", "low", "medium", "high", "critical")],
        ("mitre-subtechnique", "payload/mitre_techniques", ["T1059.001"], True),
        ("mitre-empty", "payload/mitre_techniques", [], False),
        ("mitre-3-digits", "payload/mitre_techniques", ["T105"], False),
        ("mitre-sub-2-digits", "payload/mitre_techniques", ["T1059.01"], False),
        ("mitre-lowercase", "payload/mitre_techniques", ["t1059"], False),
        ("mitre-newline", "payload/mitre_techniques", ["T1059\n"], False),
        ("mitre-fullwidth", "payload/mitre_techniques", ["T\uff11\uff10\uff15\uff19"], False),
        ("mitre-second-bad", "payload/mitre_techniques", ["T1059", "X1"], False),
        ("mitre-not-array", "payload/mitre_techniques", "T1059", False),
        ("mitre-int-item", "payload/mitre_techniques", [1059], False),
        ("tactics-empty", "payload/mitre_tactics", [], True),
        ("tactics-two", "payload/mitre_tactics", ["TA0043", "TA0002"], True),
        ("tactics-short", "payload/mitre_tactics", ["TA43"], False),
        ("tactics-technique", "payload/mitre_tactics", ["T0043"], False),
        ("description-empty", "payload/description", "", True),
        ("description-null", "payload/description", None, False),
        ("event_id-empty", "payload/event_id", "", False),
        ("source_system-int", "payload/source_system", 5, False),
        ("attr-not-object", "payload/attributes", [], False),
        ("attr-version-not-allowed-is-pipeline", "payload/attributes/schema_version", "9.9", True),
        ("attr-version-empty", "payload/attributes/schema_version", "", False),
        ("attr-version-number", "payload/attributes/schema_version", 1.0, False),
        ("attr-fp-mismatch-is-pipeline", "payload/attributes/execution_fingerprint", HEX, True),
        ("attr-fp-bad", "payload/attributes/execution_fingerprint", "xyz", False),
        ("attr-attest-bad", "payload/attributes/attestation_measurement_hash", HEX[:-1], False),
    ]
] + [
    ("telemetry", f"observed_at-{n}", TS, v, ok) for n, v, ok in [
        ("Z", "2026-11-18T10:00:00Z", True),
        ("offset-fraction", "2026-11-23T14:52:49.163896+00:00", True),
        ("lowercase-t-z", "2026-11-18t10:00:00z", True),
        ("negative-offset", "2026-11-18T10:00:00-05:30", True),
        ("offset-23-59", "2026-11-18T10:00:00+23:59", True),
        ("fraction-1", "2026-11-18T10:00:00.1Z", True),
        ("fraction-9", "2026-11-18T10:00:00.123456789Z", True),
        ("leap-second", "2026-12-31T23:59:60Z", True),
        ("fraction-10", "2026-11-18T10:00:00.1234567891Z", False),
        ("dot-no-digits", "2026-11-18T10:00:00.Z", False),
        ("month-13", "2026-13-18T10:00:00Z", False), ("month-00", "2026-00-18T10:00:00Z", False),
        ("day-32", "2026-11-32T10:00:00Z", False), ("day-00", "2026-11-00T10:00:00Z", False),
        ("hour-24", "2026-11-18T24:00:00Z", False), ("minute-60", "2026-11-18T10:60:00Z", False),
        ("second-61", "2026-11-18T10:00:61Z", False), ("no-offset", "2026-11-18T10:00:00", False),
        ("offset-24", "2026-11-18T10:00:00+24:00", False),
        ("offset-no-colon", "2026-11-18T10:00:00+0000", False),
        ("space-separator", "2026-11-18 10:00:00Z", False),
        ("no-seconds", "2026-11-18T10:00Z", False),
        ("date-only", "2026-11-18", False), ("empty", "", False), ("epoch-int", 1795445569, False),
        ("trailing-newline", "2026-11-18T10:00:00Z\n", False),
        ("leading-space", " 2026-11-18T10:00:00Z", False),
        ("fullwidth-year", "\uff12\uff10\uff12\uff16-11-18T10:00:00Z", False),
        ("arabic-indic-digits", "\u0662\u0660\u0662\u0666-11-18T10:00:00Z", False),
    ]
] + [
    ("execution_graph", n, p, v, ok) for n, p, v, ok in [
        ("graph-empty", "graph", {}, True), ("graph-list", "graph", [], False),
        ("nodes-object", "graph/nodes", {}, False), ("edges-string", "graph/edges", "n0-n1", False),
        ("target_urn-int", "graph/target_urn", 5, False),
        ("version-other-is-pipeline", "schema_version", "execution.graph.v2", True),
        ("version-empty", "schema_version", "", False),
        ("fp-bad", "execution_fingerprint", "0", False),
        ("attest-newline", "attestation_measurement_hash", HEX + "\n", False),
    ]
] + [
    ("feedback_query", f"limit-{n}", "limit", v, ok) for n, v, ok in [
        ("0", 0, False), ("1", 1, True), ("1000", 1000, True), ("1001", 1001, False),
        ("bool", True, False), ("integral-float", 10.0, True), ("string", "10", False),
        ("null", None, False), ("negative", -1, False)]
] + [
    ("adjustment", n, p, v, ok) for n, p, v, ok in [
        ("confidence--0.1", "confidence", -0.1, False), ("confidence-0", "confidence", 0, True),
        ("confidence-0.0", "confidence", 0.0, True), ("confidence-1", "confidence", 1, True),
        ("confidence-1.01", "confidence", 1.01, False),
        ("confidence-bool", "confidence", True, False),
        ("confidence-string", "confidence", "0.5", False),
        ("ttl-59", "ttl_seconds", 59, False), ("ttl-60", "ttl_seconds", 60, True),
        ("ttl-86400", "ttl_seconds", 86400, True), ("ttl-86401", "ttl_seconds", 86401, False),
        ("ttl-integral-float", "ttl_seconds", 1800.0, True),
        ("ttl-bool", "ttl_seconds", True, False),
        ("version-other", "schema_version", "feedback.adjustment.v2", False),
        ("target_urn-empty", "target_urn", "", False), ("tenant-bad", "tenant_id", "t-1", False),
        ("rationale-unicode", "rationale", "d\u00e9tection \u2014 \U0001f6a8", True),
    ]
] + [
    ("feedback_response", n, p, v, ok) for n, p, v, ok in [
        ("status-rejected", "status", "rejected", False),
        ("alg-EdDSA", "signature_algorithm", "EdDSA", False),
        ("kid-space", "kid", "bad kid", False), ("kid-129", "kid", "k" * 129, False),
        ("signature-not-base64", "signature", "%%%not-base64%%%", False),
        ("signature-unpadded", "signature", _RESPONSE["signature"].rstrip("="), False),
        ("data-empty", "data", [], True), ("data-object", "data", {"not": "a list"}, False),
        ("data-bad-adjustment", "data/0/confidence", 2, False),
        ("errors-object", "errors", {}, False),
        ("signed_at-bool", "signed_at", True, False),
        ("version-other", "schema_version", "feedback.response.v2", False),
        ("legacy-unbound-nonce", "nonce", "bQL_vaM9xv3NiHLNQnKy85ma", True),
    ]
] + [
    ("finding_record", n, p, v, ok) for n, p, v, ok in [
        ("peer-cert-upper", "peer_cert_sha256", "AB" * 32, False),
        ("signature-87", "signature", "A" * 87 + "=", False),
        ("signature-unpadded", "signature", "A" * 86, False),
        ("body_b64-empty", "body_b64", "", False),
        ("body_b64-unpadded", "body_b64", "eyJ9J", False),
        ("body_b64-newline", "body_b64", "e30=\n", False),
        ("identity-space", "identity", "a b", False),
        ("version-other", "schema_version", "finding.record.v2", False),
        ("received_at-neg", "received_at", -5, False),
    ]
] + [
    ("audit_event", n, p, v, ok) for n, p, v, ok in [
        ("outcome-maybe", "event.outcome", "maybe", False),
        ("category-ecs-array", "event.category", ["authentication"], True),
        ("category-empty-array", "event.category", [], False),
        ("category-empty", "event.category", "", False),
        ("category-int-item", "event.category", ["web", 1], False),
        ("reason-code", "event.reason", "replayed_nonce", True),
        ("reason-int", "event.reason", 5, False),
        ("status-99", "http.response.status_code", 99, False),
        ("status-600", "http.response.status_code", 600, False),
        ("status-409", "http.response.status_code", 409, True), ("kid-null", "kid", None, True),
        ("tenant-int", "tenant_id", 7, False), ("hash-bad", "hash", "00", False),
        ("timestamp-naive", "@timestamp", "2026-11-23T14:52:49", False),
        ("ecs-extra", "user_agent.original", "python-requests/2.32.5", True),
        ("event-type-string", "event.type", "access", False),
        ("event-kind-alert", "event.kind", "alert", False),
        ("sequence-0", "event.sequence", 0, False),
        ("event-hash-bad", "event.hash", "00", False),
        ("source-port-70000", "source.port", 70000, False),
        *[(f"forbidden-{k}", k, "x", False)
          for k in ("body", "body_b64", "private_key", "signature_input", "signing_input")],
    ]
]
CASES = _generated() + [(f"{s}-{n}", s, [(p, v)], ok) for s, n, p, v, ok in _SINGLE]


def _first_error(engine: Any, name: str, instance: Any) -> SchemaError | None:
    try:
        engine.validate(name, instance)
    except SchemaError as exc:
        return exc
    return None


@pytest.mark.parametrize(("name", "changes", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_case_both_engines(name: str, changes: list, expected: bool) -> None:
    instance = mutate(BASES[name], changes)
    assert verdicts(name, instance) == (expected, expected)
    hot, ref = _first_error(HOT, name, instance), _first_error(REF, name, instance)
    assert (hot is None, ref is None) == (expected, expected)
    if hot is not None and len(list(REF._get(name).iter_errors(instance))) == 1:
        assert hot.pointer == ref.pointer  # one error: both engines name the same place


# -- real bodies: interop captures and vectors ---------------------------------------------
def _vector_cases() -> list[tuple[str, str, Any, bool]]:
    out = [(f"interop-{i}", "telemetry",
            _body(_load(f"interop/telemetry_0{i}.json")["request"]["body_b64"]), True)
           for i in (1, 2, 3)]
    out += [(f"interop-{g['vector_id']}", "execution_graph", _body(g["request"]["body_b64"]), True)
            for g in _load("interop/execution_graph_requests.json")]
    for f in ("feedback_01", "feedback_02"):
        vec = _load(f"interop/{f}.json")
        query = _body(vec["query_request"]["body_b64"])
        out.append((f"interop-{f}-query", "feedback_query", query, True))
        out.append((f"interop-{f}-response", "feedback_response", vec["response_json"], True))
        out += [(f"interop-{f}-data{i}", "adjustment", a, True)
                for i, a in enumerate(vec["response_json"]["data"])]
    # telemetry_v1: the body of every case is schema-valid except these (the body nonce of
    # reject_nonce_bad_charset is malformed too, though the header check answers first).
    bad = {"reject_schema_missing_attestation", "reject_schema_bad_mitre",
           "reject_schema_extra_top_level_field", "reject_nonce_bad_charset"}
    out += [(f"telemetry_v1-{c['name']}", "telemetry", _body(c["body_b64"]), c["name"] not in bad)
            for c in _load("telemetry_v1.json")["cases"]]
    # feedback_v1: schema verdict on each response (see docs/SCHEMAS.md, emitter check order).
    fb_bad = {"reject_alg_downgrade", "reject_alg_missing", "reject_missing_signature",
              "reject_data_not_array"}
    for c in _load("feedback_v1.json")["cases"]:
        out.append((f"feedback_v1-{c['name']}", "feedback_response", c["response"],
                    c["name"] not in fb_bad))
        if c["expect"] == "ok":
            out += [(f"feedback_v1-{c['name']}-data{i}", "adjustment", a, True)
                    for i, a in enumerate(c["response"]["data"])]
    return out


VECTOR_CASES = _vector_cases()


@pytest.mark.parametrize(("name", "instance", "expected"), [c[1:] for c in VECTOR_CASES],
                         ids=[c[0] for c in VECTOR_CASES])
def test_vector_bodies(name: str, instance: Any, expected: bool) -> None:
    assert verdicts(name, instance) == (expected, expected)


POINTERS = [
    ("telemetry", [("payload/mitre_techniques", ["X1059"])], "/payload/mitre_techniques/0"),
    ("telemetry", [("payload/mitre_techniques", ["T1059", "bad"])], "/payload/mitre_techniques/1"),
    ("telemetry", [("payload/attributes/schema_version", DEL)], "/payload/attributes"),
    ("telemetry", [("injected", True)], ""),
    ("telemetry", [(TS, "2026-11-18T10:00:00Z\n")], "/payload/observed_at"),
    ("telemetry", [("signed_metadata/tenant_id", "x"), ("payload/severity", "x")],
     "/payload/severity"),
    ("feedback_response", [("data/0/confidence", 1.5)], "/data/0/confidence"),
    ("feedback_query", [("limit", 0)], "/limit"),
    ("audit_event", [("body", "raw")], ""),
]


@ENGINES
@pytest.mark.parametrize(("name", "changes", "pointer"), POINTERS)
def test_pointer_of_first_error(engine: Any, name: str, changes: list, pointer: str) -> None:
    error = _first_error(engine, name, mutate(BASES[name], changes))
    assert error is not None and error.pointer == pointer


def test_choice_of_first_error() -> None:
    broken = mutate(BASES["telemetry"], [("timestamp", -1), ("nonce", "!"), ("tenant_id", "x")])
    canonical = json.loads(json.dumps(broken, sort_keys=True))
    shuffled = dict(reversed(list(canonical.items())))
    # reference: the smallest pointer, whatever the key order
    assert {_first_error(REF, "telemetry", b).pointer for b in (canonical, shuffled)} == {"/nonce"}
    # hot path: evaluation order = the instance's key order; sorted (canonical) -> the same
    assert [_first_error(HOT, "telemetry", canonical).pointer for _ in range(3)] == ["/nonce"] * 3
    assert _first_error(HOT, "telemetry", shuffled).pointer == "/timestamp"


def test_hot_path_masks_values_in_messages() -> None:
    secret = "s3cr3t-" * 40
    error = _first_error(HOT, "telemetry", mutate(BASES["telemetry"], [("nonce", secret)]))
    assert error is not None and "s3cr3t" not in error.message


def _deep(depth: int) -> list:
    root = node = []
    for _ in range(depth):
        node.append([])
        node = node[0]
    return root


WEIRD = [None, True, 0, -1.5, "x", [], {}, 10**5000, float("nan"), float("inf"), "a" * 1_000_000,
         _deep(10_000), {"payload": _deep(10_000)}, {"timestamp": 10**5000},
         mutate(BASES["telemetry"], [("payload/attributes/deep", _deep(10_000))]),
         mutate(BASES["telemetry"], [("payload/attributes/big", 10**5000)]),
         mutate(BASES["telemetry"], [("payload", _deep(2_000))]),
         mutate(BASES["telemetry"], [("payload/mitre_tactics", [1] * 100_000)])]


@ENGINES
@pytest.mark.parametrize("name", SCHEMA_NAMES)
@pytest.mark.parametrize("instance", WEIRD, ids=range(len(WEIRD)))
def test_only_schema_error_escapes(engine: Any, name: str, instance: Any) -> None:
    verdict = engine.is_valid(name, instance)
    assert isinstance(verdict, bool)
    error = _first_error(engine, name, instance)  # anything but SchemaError fails the test
    assert (error is None) == verdict
    if error is not None:
        assert len(error.message) <= 200 and "\n" not in error.message


def test_free_members_may_nest_deeply_and_hold_big_ints() -> None:
    for extra in (_deep(10_000), 10**5000):
        body = mutate(BASES["telemetry"], [("payload/attributes/free", extra)])
        assert verdicts("telemetry", body) == (True, True)


# -- the schema files themselves ---------------------------------------------------------
def _walk(node: Any) -> Any:
    """Every dict inside a schema document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_schema_files_are_the_named_ones() -> None:
    files = {p.name for p in (VECTORS.parents[1] / "schemas").glob("*.schema.json")}
    assert files == {f"{n}.schema.json" for n in SCHEMA_NAMES}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_draft_2020_12_with_its_id(name: str) -> None:
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://fedgate.local/schemas/{name}.schema.json"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert jsonschema_rs.meta.is_valid(schema)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_regexes_are_portable(name: str) -> None:
    nodes = list(_walk(load_schema(name)))
    assert not [n for n in nodes if "format" in n and isinstance(n["format"], str)]
    for node in nodes:
        pattern = node.get("pattern")
        if not isinstance(pattern, str) or pattern == "\\n":
            continue
        assert pattern.isascii() and pattern.startswith("^") and pattern.endswith("$"), pattern
        assert not re.search(r"\\[dDwWsSbB]|\(\?[=!<]", pattern), pattern  # ASCII classes only
        assert node.get("not") == {"pattern": "\\n"}, f"{pattern}: newline guard missing"


def test_why_the_newline_guard_exists() -> None:
    """Python's re lets `$` match before a final newline; ECMA-262 and Rust do not."""
    bare = {"type": "string", "pattern": "^[0-9a-f]{2}$"}
    assert jsonschema.Draft202012Validator(bare).is_valid("ab\n")
    assert not jsonschema_rs.Draft202012Validator(bare).is_valid("ab\n")
    guarded = {**bare, "not": {"pattern": "\\n"}}
    assert not jsonschema.Draft202012Validator(guarded).is_valid("ab\n")
    assert not jsonschema_rs.Draft202012Validator(guarded).is_valid("ab\n")


def test_load_schema_gives_a_fresh_copy() -> None:
    load_schema("telemetry")["required"].clear()
    assert "payload" in load_schema("telemetry")["required"]
    with pytest.raises(KeyError):
        load_schema("nope")


@ENGINES
def test_unknown_schema_name_is_a_programming_error(engine: Any) -> None:
    with pytest.raises(KeyError):
        engine.validate("nope", {})


def test_schema_error_shape() -> None:
    error = SchemaError("/a", "x" * 500 + "\n")
    assert len(error.message) == 200 and error.message.endswith("...")
    assert str(error).startswith("schema violation at /a: ")
    assert json_pointer(["a/b", "c~d", 0]) == "/a~1b/c~0d/0" and json_pointer([]) == ""


# -- property: random JSON-shaped mutations, hot path == reference --------------------------
SPICY = ["", "\n", HEX, HEX + "\n", HEX.upper(), "T1059", "T1059.001", "TA0001", "info",
         "2026-11-18T10:00:00Z", "2026-11-18T10:00:00Z\n", "10000000-0000-0000-0000-000000000001",
         "n" * 8, "feedback.adjustment.v1", "Ed25519", "accepted", "e30=", 0, 1, 59, 60, 1000,
         1001, 86400, 86401, 253402300799, 253402300800, -1, 0.5, 1.0, 1.01, True, False, 2**64]
LEAF = st.one_of(st.none(), st.booleans(), st.integers(),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                 st.sampled_from(SPICY))
JSON = st.recursive(LEAF, lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=6)


def _paths(node: Any, prefix: tuple = ()) -> Any:
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


def _apply(doc: Any, path: tuple, op: str, key: str, value: Any) -> Any:
    if not path:
        return value if op != "add" or not isinstance(doc, dict) else {**doc, key: value}
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    target = parent[path[-1]]
    if op == "delete":
        del parent[path[-1]]
    elif op == "add" and isinstance(target, dict):
        target[key] = value
    elif op == "add" and isinstance(target, list):
        target.append(value)
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def mutated(draw: Any, name: str) -> Any:
    doc = copy.deepcopy(BASES[name])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        doc = _apply(doc, path, op, draw(st.text(max_size=8)), draw(JSON))
    return doc


def _agree(name: str, doc: Any) -> None:
    hot, ref = verdicts(name, doc)
    assert hot == ref, json.dumps(doc, default=repr)[:2000]
    assert (_first_error(HOT, name, doc) is None) == hot
    assert (_first_error(REF, name, doc) is None) == ref


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_telemetry_mutations_agree(data: Any) -> None:
    _agree("telemetry", data.draw(mutated("telemetry")))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_other_schemas_agree(data: Any) -> None:
    name = data.draw(st.sampled_from([n for n in SCHEMA_NAMES if n != "telemetry"]))
    _agree(name, data.draw(mutated(name)))
