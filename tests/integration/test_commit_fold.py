"""A commit carries its record's facts fold, computed from the body the pipeline parsed
(``Commit.fold``, gateway/feedback/fold.py ``body_fold``; issue 9: the commit path no
longer parses the record it just built back).

The carried fold must be exactly what reading the stored record gives
(``fold_record`` of ``record.data``, as ``put_record`` and the back-fill read it), for
every kind of body: telemetry naming a target or not, every severity, repeated
techniques and tactics, upper-case hex, a non-canonical body; graphs with and without a
target and nodes; a query (not folded). And each store must fold what the commit
carries, not what it would read from the record (SQLite, Redis, Redis Cluster), while a
commit that carries none is still folded from its record.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from lab import ATT, FP, IDENTITY, NOW, PIN, TELEMETRY_BODY, TENANT, Lab, body_for, raw_signed
from multidict import CIMultiDict

from gateway.feedback.fold import ANCHORED, Fold, apply, fold_record, stored_validators
from gateway.pipeline.request import Context, SignedRequest
from gateway.store import Commit, Outcome
from gateway.store.sqlite import SqliteStore
from schemas.canonical import dumps
from schemas.routes import GRAPH_PATH, QUERY_PATH, SIGNED_ROUTES, TELEMETRY_PATH

INTEROP = json.loads((Path(__file__).resolve().parents[1]
                      / "vectors/interop/telemetry_01.json").read_text())
FP_B = "5b" * 32


def telemetry(*, targets: dict[str, str] | None = None, fp: str = FP, att: str = ATT,
              **payload: Any) -> dict[str, Any]:
    """The lab telemetry body (it names no target); ``targets``: attributes naming one
    (``asset_ref``, ``target``); ``payload``: members replaced."""
    body = copy.deepcopy(TELEMETRY_BODY)
    body["execution_hash"] = fp
    body["payload"].update(payload)
    attributes = body["payload"]["attributes"]
    attributes.update(execution_fingerprint=fp, attestation_measurement_hash=att)
    attributes.update(targets or {})
    return body


def interop_body() -> dict[str, Any]:
    """The real SpectraStrike capture (tests/vectors/interop/telemetry_01.json)."""
    body = orjson.loads(base64.b64decode(INTEROP["request"]["body_b64"]))
    del body["timestamp"], body["nonce"]  # the lab signs it anew, for the lab's tenant
    body["tenant_id"] = TENANT
    if "signed_metadata" in body:
        body["signed_metadata"]["tenant_id"] = TENANT
    return body


#: name -> (route, body); every one is accepted by the pipeline
CASES: dict[str, Callable[[], tuple[str, dict[str, Any]]]] = {
    "telemetry, no target": lambda: (TELEMETRY_PATH, telemetry()),
    "telemetry, asset_ref": lambda: (TELEMETRY_PATH, telemetry(targets={"asset_ref": "db-01"})),
    "telemetry, target urn": lambda: (TELEMETRY_PATH,
                                      telemetry(targets={"target": "urn:target:ws-17"})),
    "telemetry, blank asset_ref, then target": lambda: (TELEMETRY_PATH, telemetry(
        targets={"asset_ref": "  ", "target": "db-02"})),
    **{f"telemetry, severity {s}": (lambda s=s: (TELEMETRY_PATH, telemetry(severity=s)))
       for s in ("info", "low", "medium", "high", "critical")},
    "telemetry, repeated techniques and tactics": lambda: (TELEMETRY_PATH, telemetry(
        mitre_techniques=["T1059", "T1003.001", "T1059", "T1003.001"],
        mitre_tactics=["TA0006", "TA0006", "TA0008"])),
    "telemetry, no tactics": lambda: (TELEMETRY_PATH, telemetry(mitre_tactics=[])),
    "telemetry, another event type": lambda: (TELEMETRY_PATH,
                                              telemetry(event_type="network.connect")),
    "telemetry, upper-case hex": lambda: (TELEMETRY_PATH,
                                          telemetry(fp=FP_B.upper(), att=ATT.upper())),
    "telemetry, interop capture": lambda: (TELEMETRY_PATH, interop_body()),
    "graph": lambda: (GRAPH_PATH, body_for(GRAPH_PATH)),
    "graph, no target": lambda: (GRAPH_PATH, body_for(GRAPH_PATH, graph={
        "nodes": [{"id": "a"}, {"id": "b"}, {"id": "c"}], "edges": []})),
    "graph, empty target": lambda: (GRAPH_PATH, body_for(GRAPH_PATH, graph={
        "nodes": [], "edges": [], "target_urn": ""})),
    "graph, no nodes or edges": lambda: (GRAPH_PATH, body_for(GRAPH_PATH, graph={
        "target_urn": "urn:target:g1", "extra": {"k": [1, 2]}})),
    "graph, upper-case hex": lambda: (GRAPH_PATH, body_for(
        GRAPH_PATH, execution_fingerprint=FP_B.upper(), attestation_measurement_hash=ATT.upper())),
    "query": lambda: (QUERY_PATH, body_for(QUERY_PATH)),
}


async def prepared(lab: Lab, path: str, body: dict[str, Any] | None = None, *,
                   raw: tuple[dict, bytes] | None = None) -> Commit:
    """The commit the real pipeline builds for a signed request (steps 2-11, no write),
    received a few seconds after it was signed (received_at is the gateway's clock)."""
    headers, data = raw if raw is not None else lab.signed(path, body)
    request_id = str(uuid.uuid4())
    req = SignedRequest(SIGNED_ROUTES[path], CIMultiDict(headers), data, PIN, request_id)
    return await lab.pipeline.prepare(req, NOW + 7, Context(request_id))


def read_back(commit: Commit, *, checked: bool = False) -> Fold | None:
    """The fold read from the stored record's bytes (the path the commit no longer takes)."""
    rec = commit.record
    return fold_record(rec.kind, rec.data, rec.tenant_id, commit.identity,
                       validators=stored_validators() if checked else None)


def as_bytes(fold: Fold | None) -> bytes:
    """Exact: 1, 1.0 and True are equal in Python but not in a stored state."""
    return orjson.dumps(None if fold is None else dataclasses.astuple(fold))


@pytest.mark.parametrize("case", sorted(CASES))
async def test_the_commit_carries_the_fold_its_record_reads_back(case: str) -> None:
    path, body = CASES[case]()
    commit = await prepared(Lab(None), path, body)
    assert (commit.fold is None) == (path == QUERY_PATH)
    assert commit.fold == read_back(commit) == read_back(commit, checked=True)
    assert as_bytes(commit.fold) == as_bytes(read_back(commit))


async def test_a_non_canonical_body_folds_as_its_record_reads_back() -> None:
    """require_canonical_body = false: the pipeline's strict parser, not orjson's."""
    body = telemetry(targets={"asset_ref": "db-01"}, mitre_techniques=["T1059", "T1059"])
    raw = b" " + dumps({**body, "timestamp": NOW, "nonce": "nonce-loose-01"})[:-1] + b" } "
    commit = await prepared(Lab(None, require_canonical_body=False), TELEMETRY_PATH,
                            raw=raw_signed(raw, "nonce-loose-01"))
    assert commit.fold is not None
    assert as_bytes(commit.fold) == as_bytes(read_back(commit))


async def test_the_whole_table_folds_to_byte_identical_states() -> None:
    """Every case's commit in order, folded both ways: the same facts state bytes."""
    lab = Lab(None)
    carried: dict[str, dict] = {}
    read: dict[str, dict] = {}
    for position, case in enumerate(sorted(CASES), start=1):
        commit = await prepared(lab, *CASES[case]())
        if commit.fold is not None:
            apply(carried.setdefault(commit.fold.member, {}), commit.fold.ops, position)
            fold = read_back(commit)
            apply(read.setdefault(fold.member, {}), fold.ops, position)
    assert len(carried) == 2  # two executions: FP and FP_B
    assert orjson.dumps(carried) == orjson.dumps(read)


def state_of(rows: list, member: str) -> dict[str, Any]:
    (state,) = [s for m, s, _, _ in rows if m == member]
    return orjson.loads(state) if isinstance(state, bytes | str) else dict(state)


@pytest.mark.parametrize("how", ["commit", "commit_many"])
async def test_the_store_folds_what_the_commit_carries(any_store, how: str) -> None:
    """A carried fold that differs from the record's own is what the store keeps (so the
    store never parsed the record back); a commit carrying none is folded from its record."""
    lab = Lab(any_store)
    carrying = await prepared(lab, TELEMETRY_PATH, telemetry())
    odd = Fold(carrying.fold.member, NOW + 7, (("add", "n", 7), ("num", "x:T9999", 1)))
    plain = await prepared(lab, TELEMETRY_PATH, telemetry(fp=FP_B))
    commits = [dataclasses.replace(carrying, fold=odd), dataclasses.replace(plain, fold=None)]
    if how == "commit":
        results = [await any_store.commit(c) for c in commits]
    else:
        results = await any_store.commit_many(commits)
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 2
    rows = await any_store.list_facts(TENANT, IDENTITY, 10)
    # both commits anchor their execution: Redis notes the anchored hash (fold.anchored)
    noted = {} if isinstance(any_store, SqliteStore) else {ANCHORED: ATT}
    assert state_of(rows, odd.member) == {"n": 7, "x:T9999": 1, **noted}
    derived = apply({}, read_back(plain).ops, 0)  # the lab body names no target: no 'first'
    assert state_of(rows, plain.fold.member) == {**derived, **noted}
    assert derived["n"] == 1 and "x:T1059.001" in derived
