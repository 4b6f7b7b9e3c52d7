"""Signed checkpoints, coverage and rotation (issue 10): real Ed25519 keys, real files,
the real `fedgate audit verify|rotate` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audit.chain import AuditLog
from audit.checkpoints import Checkpoint, Checkpointer, read_sidecar, sidecar_path, signing_input
from audit.rotate import rotate
from keyring.ed25519 import PrivateKey, verify
from keyring.keys import Key, Keyring

ROOT = Path(__file__).resolve().parents[2]
KEY = PrivateKey(bytes(range(32)))
KID = "audit-2026"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fedgate.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def jwks(tmp: Path, key: PrivateKey = KEY, kid: str = KID) -> Path:
    path = tmp / "audit.jwks.json"
    path.write_text(json.dumps(Keyring([Key(kid, key.public)]).to_jwks()))
    return path


def write(path: Path, n: int, every: int = 5, key: PrivateKey = KEY, kid: str = KID,
          start: int = 0) -> None:
    with AuditLog(path, fsync=False, checkpoints=Checkpointer(key, kid, every_events=every,
                                                              every_s=3600)) as log:
        for i in range(start, start + n):
            log.append({"message": f"event {i}", "n": i})


def lines(path: Path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_bytes().splitlines()]


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    out = result.stderr.splitlines()
    assert len(out) == 1 and "Traceback" not in result.stderr, result.stderr
    return out[0]


def test_a_checkpoint_follows_every_nth_event_and_signs_the_line_before(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, 12, every=5)
    events = lines(path)
    cps = [(i, e) for i, e in enumerate(events) if e.get("event.action") == "audit.checkpoint"]
    assert [e["event.sequence"] for _, e in cps] == [6, 11]  # after sequences 5 and 10
    assert len(events) == 14
    for i, e in cps:
        before = events[i - 1]
        assert (e["checkpoint.sequence"], e["checkpoint.hash"]) == (
            before["event.sequence"], before["hash"])
        assert e["prev_hash"] == before["hash"] and e["checkpoint.kid"] == KID
        cp = Checkpoint.from_mapping(e, "checkpoint.")
        sig = Checkpoint.sign(KEY, KID, cp.sequence, cp.hash, cp.signed_at).signature
        assert sig == cp.signature and cp.verifies(KEY.public)
        message = signing_input(cp.sequence, cp.hash, cp.signed_at, KID)
        assert message == (b'{"hash":"%s","kid":"audit-2026","sequence":%d,"signed_at":%d,'
                           b'"type":"fedgate.audit.checkpoint.v1"}'
                           % (cp.hash.encode(), cp.sequence, cp.signed_at))
        assert not verify(PrivateKey(bytes(32)).public, cp.signature.encode(), message)
    assert read_sidecar(sidecar_path(path)) == Checkpoint.from_mapping(cps[-1][1], "checkpoint.")


def test_tick_signs_an_unsigned_head_once_and_never_twice(tmp_path):
    path = tmp_path / "audit.jsonl"
    now = [1_800_000_000.0]
    cp = Checkpointer(KEY, KID, every_events=1000, every_s=60, clock=lambda: now[0])
    with AuditLog(path, fsync=False, checkpoints=cp) as log, \
            AuditLog(path, fsync=False, checkpoints=cp) as other:
        log.append({"n": 1})
        assert cp.tick(log) is not None  # no sidecar yet: due
        assert cp.tick(other) is None  # the head is that checkpoint
        log.append({"n": 2})
        now[0] += 30
        assert cp.tick(other) is None  # the sidecar is 30 s old
        now[0] += 31
        assert cp.tick(other).sequence == 3 and cp.tick(log) is None
    assert [e.get("event.action") for e in lines(path)].count("audit.checkpoint") == 2


def test_verify_reports_coverage_and_the_unsigned_rest(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, 12, every=5)  # checkpoints at lines 6 and 11, then 3 events
    cp = read_sidecar(sidecar_path(path))
    result = cli("audit", "verify", str(path), "--checkpoint-key", str(jwks(tmp_path)))
    assert result.returncode == 0, result.stderr
    last = lines(path)[-1]["hash"]
    assert result.stdout == (
        f"{path}: intact: 14 lines, last hash {last}, covered by checkpoint at sequence 10 "
        f"(signed_at {cp.describe().split('signed_at ')[1].split(',')[0]}, kid {KID}); "
        "3 events after it unsigned\n")


def test_a_cut_tail_before_the_sidecars_checkpoint_fails_naming_the_sequence(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, 12, every=5)
    kept = path.read_bytes().splitlines(keepends=True)[:9]  # loses the checkpoint line 11
    path.write_bytes(b"".join(kept))
    err = one_error(cli("audit", "verify", str(path), "--checkpoint-key", str(jwks(tmp_path))))
    assert err.startswith("fedgate: error: the log ends at sequence 9, but ")
    assert "holds the checkpoint at sequence 10 (signed_at " in err
    assert err.endswith("written as sequence 11: the tail was cut (at least sequences 10-11 "
                        "are missing)")


def test_the_checkpoint_line_itself_cut_off_fails_too(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, 9, every=5)  # 9 events: sequences 1-10, checkpoint line 11 is the last
    side = tmp_path / "elsewhere.checkpoint"
    side.write_bytes(sidecar_path(path).read_bytes())  # the operator's copy
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-1]))
    sidecar_path(path).unlink()
    err = one_error(cli("audit", "verify", str(path), "--checkpoint", str(side)))
    assert "the log ends at sequence 10, but " in err
    assert "written as sequence 11: the tail was cut (at least sequences 11-11" in err


def test_a_checkpoint_that_does_not_match_the_chain_fails(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, 4, every=100)
    with AuditLog(path, fsync=False) as log:  # a validly signed record of the wrong head
        bad = Checkpoint.sign(KEY, KID, 2, lines(path)[1]["hash"], 1_800_000_000)
        log.append({"event.action": "audit.checkpoint", **bad.members("checkpoint.")})
    err = one_error(cli("audit", "verify", str(path), "--checkpoint-key", str(jwks(tmp_path))))
    assert "line 5: checkpoint at sequence 2" in err and "does not match the chain" in err


@pytest.mark.parametrize("forger", ["other key, same kid", "unknown kid"])
def test_a_forged_checkpoint_fails(tmp_path, forger):
    path = tmp_path / "audit.jsonl"
    other = PrivateKey(bytes([7]) * 32)
    write(path, 5, every=5, key=other, kid=KID if forger.startswith("other") else "mallory")
    err = one_error(cli("audit", "verify", str(path), "--checkpoint-key", str(jwks(tmp_path))))
    expected = ("signature does not verify (kid audit-2026)" if forger.startswith("other")
                else "kid 'mallory' is not in")
    assert f"{path}: line 6: checkpoint at sequence 5" in err and expected in err


def test_a_forged_sidecar_fails_against_a_pem_public_key(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, 5, every=5)
    side = json.loads(sidecar_path(path).read_bytes())
    side["signed_at"] += 1
    sidecar_path(path).write_text(json.dumps(side))
    pem = tmp_path / "audit.pub.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    pem.write_bytes(Ed25519PublicKey.from_public_bytes(KEY.public).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    err = one_error(cli("audit", "verify", str(path), "--checkpoint-key", str(pem)))
    assert err.endswith(f"signature does not verify with {pem}")


def rotated(tmp_path: Path) -> tuple[Path, Path, Path]:
    """old (7 events + checkpoint), middle (5 events), new: rotated twice."""
    path = tmp_path / "audit.jsonl"
    cp = Checkpointer(KEY, KID, every_events=1000, every_s=3600)
    write(path, 7, every=1000)
    with AuditLog(path, fsync=False, checkpoints=cp) as log:
        assert rotate(log, tmp_path / "a.1", cp) == 9
        for i in range(5):
            log.append({"n": i})
        assert rotate(log, tmp_path / "a.2", cp) == 16
        log.append({"n": 99})
    return tmp_path / "a.1", tmp_path / "a.2", path


def test_rotation_continues_the_chain_and_verifies_across_files(tmp_path):
    old, middle, new = rotated(tmp_path)
    first = lines(middle)[0]
    assert first["event.action"] == "audit.rotated" and first["audit.rotated_from"] == "a.1"
    assert (first["prev_hash"], first["event.sequence"]) == (lines(old)[-1]["hash"], 9)
    assert lines(old)[-1]["event.action"] == "audit.checkpoint"
    keys = str(jwks(tmp_path))
    result = cli("audit", "verify", str(old), str(middle), str(new), "--checkpoint-key", keys)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{old} + {middle} + {new}: intact: 17 lines, last hash ")
    assert "covered by checkpoint at sequence 14" in result.stdout
    assert result.stdout.endswith("; 1 events after it unsigned\n")


def test_a_rotated_file_alone_says_where_its_chain_starts(tmp_path):
    old, middle, _ = rotated(tmp_path)
    result = cli("audit", "verify", str(middle), "--checkpoint-key", str(jwks(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert (f"(chain starts at sequence 9, after hash {lines(old)[-1]['hash']}, rotated "
            "from a.1)") in result.stdout


def test_a_missing_middle_file_fails(tmp_path):
    old, middle, new = rotated(tmp_path)
    err = one_error(cli("audit", "verify", str(old), str(new)))
    assert err == (f"fedgate: error: {new} does not continue {old}: it starts after sequence "
                   "15, which ends at sequence 8: a file between them is missing, or the "
                   "files are out of order")


def test_deleting_the_first_lines_of_a_rotated_file_is_still_a_break(tmp_path):
    _, middle, _ = rotated(tmp_path)
    middle.write_bytes(b"".join(middle.read_bytes().splitlines(keepends=True)[1:]))
    err = one_error(cli("audit", "verify", str(middle)))
    assert "broken: line 1: prev_hash does not match" in err


def test_a_batch_gets_its_checkpoints_right_after_the_events_they_sign(tmp_path):
    """Group commit (issue 9): one batch of 12 events with every_events=5 is one write
    holding checkpoint lines right after sequences 5 and 10, the sidecar the last one."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False, checkpoints=Checkpointer(KEY, KID, every_events=5,
                                                              every_s=3600)) as log:
        out = log.append_many([{"message": f"event {i}", "n": i} for i in range(12)])
        assert log.batches == 1
    assert [b["event.sequence"] for b in out] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14]
    events = lines(path)
    cps = [e for e in events if e.get("event.action") == "audit.checkpoint"]
    assert [(e["event.sequence"], e["checkpoint.sequence"]) for e in cps] == [(6, 5), (11, 10)]
    assert read_sidecar(sidecar_path(path)) == Checkpoint.from_mapping(cps[-1], "checkpoint.")
    assert cli("audit", "verify", str(path), "--checkpoint-key", str(jwks(tmp_path))
               ).returncode == 0
