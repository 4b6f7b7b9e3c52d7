"""The emitter's durable ledger on real SQLite files, across re-opens and real crashes.

PROTOCOL.md §6 step 9: the replay cache survives restarts; an emitter restart between
receiving and applying feedback applies no feedback twice; a kill before COMMIT leaves
neither the nonce claim nor an applied row.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, load_vectors

from emitter.ledger import Ledger
from emitter.verify import Expectation, FeedbackRejected, VerifiedFeedback, check_feedback
from keyring.ed25519 import PrivateKey
from keyring.keys import parse_jwks
from schemas.signing import feedback_signing_input

FEEDBACK = load_vectors("feedback_v1.json")
CASES = {case["name"]: case for case in FEEDBACK["cases"]}
BASE = CASES["accept_basic"]
RING = parse_jwks(FEEDBACK["keyring"])
SEED = bytes.fromhex(FEEDBACK["feedback_private_key_seed_hex"]["vv-fb-2026"])
TENANT = BASE["requested_tenant"]


def verified(case: dict[str, Any] = BASE) -> VerifiedFeedback:
    expect = Expectation(case["requested_tenant"], case["request_nonce"], case["sent"])
    return check_feedback(case["response"], expect, keyring=RING, now=case["now"],
                          skew_s=FEEDBACK["clock_skew_s"])


def resigned(nonce_suffix: str, data: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """accept_basic answered again: a new bound nonce, same (or given) adjustments."""
    case = copy.deepcopy(BASE)
    response = case["response"]
    response["nonce"] = f"{case['request_nonce']}.{nonce_suffix}"
    if data is not None:
        response["data"] = data
    message = feedback_signing_input(TENANT, response["signed_at"], response["nonce"],
                                     response["schema_version"], response["kid"],
                                     response["data"])
    response["signature"] = base64.b64encode(PrivateKey(SEED).sign(message)).decode()
    return case


# -- durability across re-opens ------------------------------------------------------------

def test_pragmas_are_durable(tmp_path: Path) -> None:
    with Ledger(tmp_path / "emitter.db") as ledger:
        db = ledger._db
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_replay_cache_and_applied_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "emitter.db"
    with Ledger(path) as ledger:
        fresh = ledger.apply(verified(), now=BASE["now"])
        assert fresh == BASE["response"]["data"]
        before = ledger.applied()
    with Ledger(path) as reopened:  # a new object, a new connection: a restart
        assert reopened.claimed(BASE["response"]["nonce"])
        with pytest.raises(FeedbackRejected) as info:
            reopened.apply(verified(), now=BASE["now"])
        assert info.value.code == "replayed_nonce"
        assert reopened.applied() == before == BASE["response"]["data"]
        assert reopened.applied(TENANT) == before
        assert reopened.applied("00000000-0000-0000-0000-000000000000") == []


def test_same_adjustment_in_two_responses_is_applied_once(tmp_path: Path) -> None:
    first, second = resigned("A" * 16), resigned("B" * 16)
    with Ledger(tmp_path / "emitter.db") as ledger:
        assert len(ledger.apply(verified(first), now=BASE["now"])) == 1
        assert ledger.apply(verified(second), now=BASE["now"]) == []
        assert ledger.claimed(second["response"]["nonce"])  # the second nonce is spent too
        assert len(ledger.applied()) == 1


def test_duplicate_within_one_response_and_new_adjustment(tmp_path: Path) -> None:
    """Within one response: an exact copy, and the same adjustment re-issued a second
    later (only ``timestamp`` differs), are the same adjustment; another target is new."""
    adj = BASE["response"]["data"][0]
    later = {**adj, "timestamp": adj["timestamp"] + 1}
    other = {**adj, "target_urn": "urn:target:ws-18"}
    case = resigned("C" * 16, data=[adj, adj, later, other])
    with Ledger(tmp_path / "emitter.db") as ledger:
        assert ledger.apply(verified(case), now=BASE["now"]) == [adj, other]
        assert ledger.applied() == [adj, other]


def _reissued(suffix: str, **changes: Any) -> dict[str, Any]:
    """accept_basic's adjustment as the gateway issues it again later: same identity,
    with a new ``timestamp`` (its issue time) and whatever else ``changes`` says."""
    adj = {**BASE["response"]["data"][0], **changes}
    return resigned(suffix, data=[adj])


def test_adjustment_identity_ignores_timestamp_until_its_ttl_expires(tmp_path: Path) -> None:
    """The gateway stamps each answer's adjustments with its own clock: the same
    adjustment seconds later is not new. It is applied again only once it has expired
    (``applied_at + ttl_seconds``), as a refresh."""
    adj = BASE["response"]["data"][0]
    ttl, t0 = adj["ttl_seconds"], BASE["now"]
    with Ledger(tmp_path / "emitter.db") as ledger:
        assert ledger.apply(verified(), now=t0) == [adj]
        for n, delta in enumerate((1, 5, ttl - 1)):
            again = _reissued(f"{'E' * 15}{n}", timestamp=adj["timestamp"] + delta,
                              confidence=0.5, rationale="re-evaluated", ttl_seconds=600)
            assert ledger.apply(verified(again), now=t0 + delta) == []  # still in force
        assert ledger.in_force(t0 + ttl - 1) == [adj]
        assert ledger.in_force(t0 + ttl) == []  # expired at applied_at + ttl_seconds
        refresh = _reissued("F" * 16, timestamp=adj["timestamp"] + ttl)
        fresh = refresh["response"]["data"]
        assert ledger.apply(verified(refresh), now=t0 + ttl) == fresh  # applied again
        assert ledger.applied() == [adj, *fresh]
        assert ledger.in_force(t0 + ttl) == fresh
        assert ledger.apply(verified(_reissued("G" * 16)), now=t0 + ttl + 1) == []
    rows = sqlite3.connect(tmp_path / "emitter.db").execute(
        "SELECT applied_at, expires_at FROM applied_adjustments ORDER BY seq").fetchall()
    assert rows == [(t0, t0 + ttl), (t0 + ttl, t0 + 2 * ttl)]


@pytest.mark.parametrize("member", ["action", "control", "target_urn", "tenant_id"])
def test_adjustment_identity_members_each_make_a_new_adjustment(tmp_path: Path,
                                                                member: str) -> None:
    adj = BASE["response"]["data"][0]
    changed = {**adj, member: adj[member] + "-x"}
    with Ledger(tmp_path / "emitter.db") as ledger:
        assert ledger.apply(verified(), now=BASE["now"]) == [adj]
        smuggled = VerifiedFeedback(kid="vv-fb-2026", nonce="other.nonce-AAAAAAAAAAAAAAAA",
                                    signed_at=BASE["now"], adjustments=(changed,))
        assert ledger.apply(smuggled, now=BASE["now"] + 1) == [changed]


def test_ledger_schema_creation_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "emitter.db"
    with Ledger(path) as ledger:
        ledger.apply(verified(), now=BASE["now"])
    with Ledger(path) as again, Ledger(path) as third:  # re-created over existing tables
        assert again.applied() == third.applied() == BASE["response"]["data"]


def test_replayed_nonce_applies_nothing_new(tmp_path: Path) -> None:
    """The replay claim comes first: a replayed nonce rolls back the whole apply."""
    adj = BASE["response"]["data"][0]
    other = resigned("D" * 16, data=[{**adj, "action": "observe"}])
    with Ledger(tmp_path / "emitter.db") as ledger:
        ledger.apply(verified(other), now=BASE["now"])
        smuggled = VerifiedFeedback(kid="vv-fb-2026", nonce=other["response"]["nonce"],
                                    signed_at=BASE["now"], adjustments=(adj,))
        with pytest.raises(FeedbackRejected):
            ledger.apply(smuggled, now=BASE["now"])
        assert [a["action"] for a in ledger.applied()] == ["observe"]


def test_nonce_claim_expires_after_ttl(tmp_path: Path) -> None:
    with Ledger(tmp_path / "emitter.db") as ledger:
        ledger.apply(verified(), now=BASE["now"], nonce_ttl_s=100)
        with pytest.raises(FeedbackRejected):
            ledger.apply(verified(), now=BASE["now"] + 100)  # still inside the TTL
        assert ledger.apply(verified(), now=BASE["now"] + 101) == []  # purged; not re-applied
        with pytest.raises(ValueError):
            ledger.apply(verified(), now=BASE["now"], nonce_ttl_s=60)


@pytest.mark.parametrize(("fp", "att"), [("f" * 64, "not-a-hash"), ("f" * 63, "a" * 64),
                                         ("f" * 64, "g" * 64), ("f" * 64 + "\n", "a" * 64)])
def test_record_sent_refuses_what_is_not_64_hex(tmp_path: Path, fp: str, att: str) -> None:
    with Ledger(tmp_path / "emitter.db") as ledger:
        with pytest.raises(ValueError, match="64 hex"):
            ledger.record_sent(TENANT, fp, att)
        assert ledger.sent_for(TENANT) == {}
        ledger.record_sent(TENANT, "f" * 64, "a" * 64)  # a well-formed pair still binds
        assert ledger.sent_hash(TENANT, "F" * 64) == "a" * 64


def test_sent_survives_reopen_and_first_hash_anchors(tmp_path: Path) -> None:
    path = tmp_path / "emitter.db"
    fp, att = next(iter(BASE["sent"].items()))
    with Ledger(path) as ledger:
        ledger.record_sent(TENANT, fp.upper(), att.upper())
        ledger.record_sent(TENANT, fp, att)  # same again: idempotent
        with pytest.raises(ValueError):
            ledger.record_sent(TENANT, fp, "ee" * 32)
    with Ledger(path) as reopened:
        assert reopened.sent_for(TENANT) == {fp: att}
        assert reopened.sent_for("00000000-0000-0000-0000-000000000000") == {}
        expect = Expectation(TENANT, BASE["request_nonce"], reopened.sent_for(TENANT))
        check_feedback(BASE["response"], expect, keyring=RING, now=BASE["now"])


# -- real crashes: a child process killed with SIGKILL -------------------------------------

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, "tests/integration")
import test_emitter_ledger as t
from emitter.ledger import Ledger

mode, db = sys.argv[1], Path(sys.argv[2])
ledger = Ledger(db)
feedback = t.verified()
if mode == "after_verify":
    print("verified", flush=True)
    time.sleep(120)
elif mode == "before_commit":
    seen = []
    def hold(statement):  # runs as each statement starts, before SQLite executes it
        seen.append(statement)
        wrote = any("INTO applied" in s for s in seen)
        if wrote and statement.strip().upper() == "COMMIT":  # the COMMIT after every write
            print("in-transaction", flush=True)
            time.sleep(120)
    ledger._db.set_trace_callback(hold)
    ledger.apply(feedback, now=t.BASE["now"])
else:
    print(json.dumps(ledger.apply(feedback, now=t.BASE["now"])), flush=True)
"""


def run_child(mode: str, db: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(db)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)


def kill_at(mode: str, marker: str, db: Path) -> None:
    child = run_child(mode, db)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == marker
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize(("mode", "marker"), [("after_verify", "verified"),
                                              ("before_commit", "in-transaction")])
def test_kill_before_commit_then_restart_applies_exactly_once(
    tmp_path: Path, mode: str, marker: str
) -> None:
    db = tmp_path / "emitter.db"
    kill_at(mode, marker, db)
    with Ledger(db) as ledger:  # the restarted emitter
        assert not ledger.claimed(BASE["response"]["nonce"])
        assert ledger.applied() == []
        assert ledger.apply(verified(), now=BASE["now"]) == BASE["response"]["data"]
        with pytest.raises(FeedbackRejected):
            ledger.apply(verified(), now=BASE["now"])
        assert ledger.applied() == BASE["response"]["data"]


def test_apply_completed_in_child_is_not_repeated_after_restart(tmp_path: Path) -> None:
    db = tmp_path / "emitter.db"
    child = run_child("apply", db)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    assert len(json.loads(out)) == 1
    with Ledger(db) as ledger:
        with pytest.raises(FeedbackRejected) as info:
            ledger.apply(verified(), now=BASE["now"])
        assert info.value.code == "replayed_nonce"
        assert ledger.applied() == BASE["response"]["data"]
    rows = sqlite3.connect(db).execute(
        "SELECT count(*) FROM applied_adjustments").fetchone()[0]
    assert rows == 1
