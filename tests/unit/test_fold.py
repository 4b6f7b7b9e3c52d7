"""The facts fold (gateway/feedback/fold.py) gives exactly the facts the records give.

Random findings and graphs (several executions, two attestation hashes each, targets
named and not, ties between targets, timestamps out of order, severities off the scale)
are folded in store order into JSON states; the facts read back from the states must
equal :func:`facts_from_records` over the same records, for every anchoring and owner.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.feedback.evidence import Evidence
from gateway.feedback.facts import facts_from_records
from gateway.feedback.fold import (
    ANCHORED,
    Fold,
    anchored,
    apply,
    evidence_ops,
    facts_from_states,
    noted_anchor,
)

TENANT, ME = "t-1", "me"
FPS = ("a1" * 32, "b2" * 32, "c3" * 32)
HASHES = ("0d" * 32, "e4" * 32)
TARGETS = (None, "db-01", "urn:target:db-01", "urn:x:ws", "  ")
WORDS = st.sampled_from(["T1059", "T1059.001", "T1003", "TA0006", "TA0008", "", "x"])

finding = st.fixed_dictionaries({
    "severity": st.sampled_from(["info", "low", "medium", "high", "critical", "nope", None]),
    "mitre_techniques": st.one_of(st.none(), st.lists(WORDS, max_size=3)),
    "mitre_tactics": st.one_of(st.none(), st.lists(WORDS, max_size=3)),
    "event_type": st.sampled_from([None, "", "process.start", "net.conn"]),
    "target": st.sampled_from(TARGETS),
    "key": st.sampled_from(["asset_ref", "target"]),
})
graph = st.fixed_dictionaries({
    "nodes": st.integers(0, 12), "edges": st.integers(0, 12),
    "target_urn": st.sampled_from([None, "", "urn:target:g1", "urn:target:db-01"]),
})
record = st.tuples(st.sampled_from(["finding", "finding", "graph"]), st.sampled_from(FPS),
                   st.sampled_from(HASHES[:1] * 3 + HASHES[1:]), st.integers(1_000, 1_010),
                   finding, graph)


def evidence(kind: str, fp: str, att: str, at: int, f: dict, g: dict) -> Evidence:
    if kind == "graph":
        body = {"graph": {"nodes": [{}] * g["nodes"], "edges": [{}] * g["edges"],
                          **({} if g["target_urn"] is None else {"target_urn": g["target_urn"]})}}
    else:
        payload = {k: v for k, v in f.items() if k not in ("target", "key") and v is not None}
        payload["attributes"] = {} if f["target"] is None else {f["key"]: f["target"]}
        body = {"payload": payload}
    return Evidence(kind, ME, TENANT, fp, att, at, body)


def folded_rows(evs: list, anchoring: dict) -> list:
    """``Store.list_facts`` rows of the records ``evs`` (oldest first) folded as a store
    folds them; ``anchoring``: fingerprint → (anchored hash, owner)."""
    states: dict[str, dict] = {}
    for position, ev in enumerate(evs, start=1):
        fold = Fold(f"{ev.execution_fingerprint}:{ev.attestation_hash}", ev.received_at,
                    tuple(evidence_ops(ev)))
        apply(states.setdefault(fold.member, {}), fold.ops, position)
    return [(member, orjson.dumps(state), *anchoring[member[:64]])
            for member, state in states.items()]


@settings(max_examples=300, deadline=None)
@given(st.lists(record, max_size=40),
       st.dictionaries(st.sampled_from(FPS),
                       st.tuples(st.sampled_from(HASHES), st.sampled_from([ME, "other", None])),
                       max_size=2))
def test_folded_states_give_the_records_facts(records, anchoring) -> None:
    evs = [evidence(*r) for r in records]  # store order: oldest first
    anchoring = {fp: anchoring.get(fp, (HASHES[0], ME)) for fp in FPS}  # mostly ours
    rows = folded_rows(evs, anchoring)
    anchors = {fp: h for fp, (h, owner) in anchoring.items() if owner == ME and h}
    expected = facts_from_records(TENANT, [e for e in evs if e.kind == "finding"],
                                  [e for e in evs if e.kind == "graph"], anchors)
    assert facts_from_states(TENANT, ME, rows) == expected


ANCHORED_ROWS = {  # (anchor tenant, anchor fingerprint) -> noted?
    "the member's execution": ((TENANT, FPS[0]), True),
    "another tenant's": (("t-2", FPS[0]), False),
    "another execution": ((TENANT, FPS[1]), False),
    "upper-case (looked up as is)": ((TENANT, FPS[0].upper()), False),
    "a prefix of the fingerprint": ((TENANT, FPS[0][:63]), False),
}


@pytest.mark.parametrize("anchor, noted", ANCHORED_ROWS.values(), ids=ANCHORED_ROWS)
def test_a_commit_notes_the_hash_it_anchors_its_own_execution_with(anchor, noted) -> None:
    """fold.anchored: the commit's anchored hash is noted ("A", a ``set``) only when the
    anchor is the folded execution's, in the form both stores look anchors up by."""
    fold = Fold(f"{FPS[0]}:{HASHES[0]}", 1_000, (("add", "n", 1),))
    got = anchored(fold, TENANT, *anchor, HASHES[0].upper())
    assert got == (Fold(fold.member, 1_000, (("add", "n", 1), ("set", ANCHORED,
                                                              HASHES[0].upper())))
                   if noted else fold)


NASTY = st.sampled_from(['"A', '"A":"', ',"A":"', '{"A":"x', "\\", '\\"A', "A", "é", "/", ""])
text = st.lists(st.one_of(NASTY, st.text(max_size=3)), max_size=4).map("".join)
state_field = st.one_of(st.sampled_from(["n", "s", "ts", "gt", "u", "gn"]),
                        st.tuples(st.sampled_from(["x:", "a:", "e:", "t:", "o:"]), text)
                        .map("".join))


@settings(max_examples=1_000, deadline=None)
@given(st.lists(st.tuples(state_field, st.one_of(st.integers(0, 10**12), text)), max_size=8),
       st.one_of(st.none(), st.sampled_from(HASHES + ("", HASHES[0].upper())), text),
       st.integers(0, 8))
def test_the_noted_anchor_is_read_from_the_bytes_as_decoding_reads_it(fields, note,
                                                                       where) -> None:
    """fold.noted_anchor (a Redis query reads the note without decoding the state) gives
    what decoding gives, wherever the note sits and whatever the other names and values
    hold: quotes, backslashes, ``"A":"`` inside them, non-ASCII."""
    state = dict(fields)
    state.pop(ANCHORED, None)
    items = list(state.items())
    if note is not None:
        items.insert(min(where, len(items)), (ANCHORED, note))
    raw = orjson.dumps(dict(items))
    assert noted_anchor(raw) == orjson.loads(raw).get(ANCHORED)
