"""audit/: event builders, the hash chain, tamper detection as a table, O(1) append."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import audit.chain as chain
import audit.tail as tail
from audit import (
    AuditError,
    AuditLog,
    AuditSink,
    VerifyResult,
    feedback_event,
    request_event,
    verify_file,
)
from audit.events import FEEDBACK_CATEGORIES, rfc3339_ms
from schemas.validate import ReferenceValidators, SchemaError, Validators

NOW = 1_795_445_569.163  # 2026-11-23T14:52:49.163Z
ZEROS = "0" * 64
FORBIDDEN = {"body", "body_b64", "signature_input", "signing_input", "private_key"}


def make_event(i: int) -> dict:
    if i % 2:
        return request_event(
            action="telemetry.rejected", outcome="failure", category=["authentication"],
            status=401, request_id=f"req-{i}", reason="invalid_signature",
            identity="spectrastrike-producer", peer_sha256="ab" * 32, kid="ss-a-2026",
            detail="signature does not verify", now=NOW + i,
        )
    return request_event(
        action="telemetry.accepted", outcome="success", category=["web"], status=202,
        request_id=f"req-{i}", identity="spectrastrike-producer", peer_sha256="ab" * 32,
        tenant_id="10000000-0000-0000-0000-000000000001", kid="ss-a-2026",
        execution_fingerprint="4a" * 32, attestation_hash="74" * 32, now=NOW + i,
    )


def reference_hash(event: dict) -> str:
    """The §7 rule written out independently of audit.chain: everything but the hash
    itself, under either of its names ([v1.1] ``event.hash`` is the same value)."""
    assert "hash" not in event or event.get("event.hash", event["hash"]) == event["hash"]
    rest = {k: v for k, v in event.items() if k not in ("hash", "event.hash")}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_log(path: Path, n: int, *, fsync: bool = False) -> list[dict]:
    with AuditLog(path, fsync=fsync) as log:
        return [log.append(make_event(i)) for i in range(n)]


@pytest.fixture
def five(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# -- the chain -----------------------------------------------------------------------------

def test_five_events_chain_and_verify(five: Path) -> None:
    events = [json.loads(line) for line in lines_of(five)]
    assert len(events) == 5
    prev = ZEROS
    for event in events:
        assert event["prev_hash"] == prev
        assert event["hash"] == reference_hash(event)
        prev = event["hash"]
    assert verify_file(five) == VerifyResult(True, 5, None, None, prev)


def test_append_returns_the_written_event(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, fsync=False) as log:
        stale = {**make_event(0), "prev_hash": "f" * 64, "hash": "e" * 64}
        written = log.append(stale)
    assert written == json.loads(path.read_bytes())
    assert written["prev_hash"] == ZEROS and written["hash"] == reference_hash(written)


def test_empty_file_is_an_intact_empty_chain(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.touch()
    assert verify_file(path) == VerifyResult(True, 0, None, None, ZEROS)
    assert not verify_file(tmp_path / "missing.jsonl").ok


# -- tampering: each row edits a copy of a 5-line log; verify names the first bad line ----

def _forged(prev: str) -> bytes:
    event = {**make_event(9), "prev_hash": prev}
    event["hash"] = reference_hash(event)
    return json.dumps(event, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _edit_line3(ls: list[bytes]) -> list[bytes]:
    event = json.loads(ls[2])
    event["http.response.status_code"] = 200
    ls[2] = json.dumps(event, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return ls


def _set(index: int, key: str, value: str) -> Callable[[list[bytes]], list[bytes]]:
    """Set one member of line ``index + 1``, kept canonical (nothing else changes)."""
    def op(ls: list[bytes]) -> list[bytes]:
        event = json.loads(ls[index])
        event[key] = value
        ls[index] = json.dumps(event, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        return ls
    return op


def _prev_of(ls: list[bytes], index: int) -> str:
    return json.loads(ls[index])["hash"]


def _duplicate_key(ls: list[bytes]) -> list[bytes]:
    ls[3] = ls[3].replace(b'{"@timestamp"', b'{"request_id":"req-evil","@timestamp"', 1)
    return ls


TAMPER: list[tuple[str, Callable[[list[bytes]], list[bytes]], int, str]] = [
    ("edit-field-line-3", _edit_line3, 3, "hash mismatch"),
    ("delete-line-2", lambda ls: ls[:1] + ls[2:], 2, "prev_hash"),
    ("insert-forged-wrong-prev", lambda ls: ls[:2] + [_forged("ab" * 32)] + ls[2:], 3,
     "prev_hash"),
    ("insert-forged-right-prev", lambda ls: ls[:2] + [_forged(_prev_of(ls, 1))] + ls[2:], 4,
     "prev_hash"),
    ("swap-lines-2-3", lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2, "prev_hash"),
    ("truncate-last-line", lambda ls: ls[:4] + [ls[4][: len(ls[4]) // 2]], 5, "torn"),
    ("strip-final-newline", lambda ls: ls[:4] + [ls[4][:-1]], 5, "torn"),
    ("append-non-json", lambda ls: [*ls, b"this is not json\n"], 6, "not JSON"),
    ("append-json-array", lambda ls: [*ls, b"[1,2]\n"], 6, "not a JSON object"),
    ("insert-blank-line", lambda ls: ls[:3] + [b"\n"] + ls[3:], 4, "not JSON"),
    ("delete-first-line", lambda ls: ls[1:], 1, "prev_hash"),
    ("re-serialised-line-2", lambda ls: [ls[0], ls[1].replace(b'","', b'", "'), *ls[2:]], 2,
     "canonical"),
    ("duplicate-key-line-4", _duplicate_key, 4, "canonical"),
    ("hash-removed-line-5", lambda ls: ls[:4] + [re.sub(rb'"hash":"[0-9a-f]+",', b"", ls[4])],
     5, "ill-formed hash"),
    # [v1.1] event.hash is left out of the hash (it is the hash): only the check that it
    # equals hash catches an edit of it alone
    ("edit-event-hash-line-3", _set(2, "event.hash", "ab" * 32), 3, "event.hash differs"),
    ("edit-fedgate-prev-hash-line-2", _set(1, "fedgate.prev_hash", "ab" * 32), 2,
     "hash mismatch"),
    ("prev-hash-upper-line-1", lambda ls: [ls[0].replace(b'"prev_hash":"0', b'"prev_hash":"O'),
                                           *ls[1:]], 1, "ill-formed prev_hash"),
]


@pytest.mark.parametrize(("op", "bad_line", "reason"), [row[1:] for row in TAMPER],
                         ids=[row[0] for row in TAMPER])
def test_tampering_is_detected(five: Path, tmp_path: Path, op: Callable, bad_line: int,
                               reason: str) -> None:
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(b"".join(op(lines_of(five))))
    assert copy.read_bytes() != five.read_bytes()
    result = verify_file(copy)
    assert not result.ok
    assert result.first_bad_line == bad_line
    assert result.lines == bad_line - 1
    assert reason in result.reason
    assert f"line {bad_line}:" in str(result)


def test_chain_members_are_written_under_their_ecs_names_too(five: Path) -> None:
    """[v1.1] event.hash = hash, fedgate.prev_hash = prev_hash, event.sequence = line."""
    for number, event in enumerate(map(json.loads, lines_of(five)), start=1):
        assert event["event.hash"] == event["hash"] == reference_hash(event)
        assert event["fedgate.prev_hash"] == event["prev_hash"]
        assert event["event.sequence"] == number


def test_an_edited_event_hash_on_the_last_line_stops_the_appender(five: Path) -> None:
    data = lines_of(five)
    five.write_bytes(b"".join(_set(4, "event.hash", "ab" * 32)(data)))
    with AuditLog(five, fsync=False) as log, pytest.raises(AuditError, match="edited"):
        log.append(make_event(5))
    assert len(lines_of(five)) == 5


def test_tamper_table_covers_the_brief() -> None:
    names = {row[0] for row in TAMPER}
    assert {"edit-field-line-3", "delete-line-2", "insert-forged-wrong-prev", "swap-lines-2-3",
            "truncate-last-line", "append-non-json", "delete-first-line"} <= names


# -- appending to an existing file -----------------------------------------------------------

def test_reopening_continues_the_chain(five: Path) -> None:
    old_last = json.loads(lines_of(five)[-1])["hash"]
    with AuditLog(five) as log:
        new = log.append(make_event(5))
    assert new["prev_hash"] == old_last
    assert verify_file(five).lines == 6 and verify_file(five).ok


@pytest.mark.parametrize("cut", [1, 40, "half"])
def test_torn_last_line_refuses_to_append(five: Path, cut: int | str) -> None:
    data = five.read_bytes()
    torn = data[:-1] if cut == 1 else data[: len(data) - (len(lines_of(five)[-1]) // 2
                                                         if cut == "half" else cut)]
    five.write_bytes(torn)
    with AuditLog(five) as log, pytest.raises(AuditError, match="torn"):
        log.append(make_event(5))
    assert five.read_bytes() == torn  # nothing written


@pytest.mark.parametrize(("corrupt", "match"), [
    (lambda line: line.replace(b'"req-4"', b'"req-X"'), "own hash"),
    (lambda line: b"garbage\n", "not JSON"),
    (lambda line: re.sub(rb'"hash":"[0-9a-f]+",', b"", line), "no well-formed hash"),
])
def test_corrupt_last_line_refuses_to_append(five: Path, corrupt: Callable, match: str) -> None:
    ls = lines_of(five)
    five.write_bytes(b"".join([*ls[:-1], corrupt(ls[-1])]))
    before = five.read_bytes()
    with AuditLog(five) as log, pytest.raises(AuditError, match=match):
        log.append(make_event(5))
    assert five.read_bytes() == before


def test_follows_the_path_when_the_file_is_replaced(five: Path) -> None:
    with AuditLog(five, fsync=False) as log:
        five.rename(five.with_suffix(".1"))  # rotated by someone else
        first = log.append(make_event(0))
        five.unlink()
        five.write_bytes(b"")  # recreated empty by another process
        second = log.append(make_event(1))
    assert first["prev_hash"] == ZEROS and second["prev_hash"] == ZEROS
    assert verify_file(five).lines == 1 and verify_file(five.with_suffix(".1")).lines == 5


def test_closed_log_refuses(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.close()
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append(make_event(0))


def test_threads_share_one_log(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    log = AuditLog(path, fsync=False)
    threads = [threading.Thread(target=lambda: [log.append(make_event(i)) for i in range(200)])
               for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    log.close()
    assert verify_file(path) == VerifyResult(True, 800, None, None, verify_file(path).last_hash)


# -- O(1) append: bytes read per append do not depend on the file's length --------------------

def _read_cost(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    calls, total = [], []
    real = tail._read_block

    def spy(fd: int, offset: int, length: int) -> bytes:
        data = real(fd, offset, length)
        calls.append(offset)
        total.append(len(data))
        return data

    monkeypatch.setattr(tail, "_read_block", spy)  # counts only; behaviour unchanged
    with AuditLog(path, fsync=False) as log:
        for i in range(3):
            log.append(make_event(i))
    monkeypatch.undo()
    return len(calls), sum(total)


def test_append_reads_only_the_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_log(small, 10)
    write_log(large, 10_000)
    assert large.stat().st_size > 100 * 8192
    small_calls, small_bytes = _read_cost(small, monkeypatch)
    large_calls, large_bytes = _read_cost(large, monkeypatch)
    # one block for the first append; the next two trust the head kept in memory
    assert small_calls == large_calls == 1
    assert small_bytes <= large_bytes <= tail._BLOCK
    assert verify_file(large).ok and verify_file(large).lines == 10_003


def test_the_head_in_memory_is_dropped_when_another_writer_appended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two appenders on one file (two workers): each trusts its cached head only while
    the file's size is what it left, so the chain never forks."""
    path = tmp_path / "two.jsonl"
    reads = []
    real = tail._read_block
    monkeypatch.setattr(tail, "_read_block", lambda *a: reads.append(a) or real(*a))
    with AuditLog(path, fsync=False) as a, AuditLog(path, fsync=False) as b:
        a.append(make_event(0))  # empty file: nothing to read
        a.append(make_event(1))  # cached
        assert reads == []
        b.append(make_event(2))  # b has no cache: reads the tail
        assert len(reads) == 1
        a.append(make_event(3))  # the size changed under a: reads the tail again
        assert len(reads) == 2
        a.append_many([make_event(4), make_event(5)])  # cached again: one write
        assert len(reads) == 2
    assert verify_file(path).ok and verify_file(path).lines == 6
    assert [json.loads(line)["request_id"] for line in lines_of(path)] == [
        make_event(i)["request_id"] for i in range(6)]


def test_a_batch_is_one_write_and_one_fsync(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    with AuditLog(path) as log:
        bodies = log.append_many([make_event(i) for i in range(50)])
        assert (log.batches, log.events, log.fsyncs) == (1, 50, 1)
        log.append(make_event(50))
        assert (log.batches, log.events, log.fsyncs) == (2, 51, 2)
    assert [b[chain.SEQUENCE] for b in bodies] == list(range(1, 51))
    assert verify_file(path).ok and verify_file(path).lines == 51


def test_a_batch_leaves_out_only_the_event_readers_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    with AuditLog(path, fsync=False) as log:
        out = log.append_many([make_event(0), {**make_event(1), "n": 1 << 70}, make_event(2)])
    assert isinstance(out[1], chain.AuditError) and not isinstance(out[0], Exception)
    assert out[2]["prev_hash"] == out[0]["hash"]
    assert verify_file(path).ok and verify_file(path).lines == 2


def test_a_long_last_line_is_read_in_several_blocks(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "long.jsonl"
    with AuditLog(path, fsync=False) as log:
        log.append(make_event(0))
        long = log.append({**make_event(1), "message": "x" * (3 * tail._BLOCK)})
    calls, _ = _read_cost(path, monkeypatch)
    assert calls >= 4  # 3+ blocks for the long line, then one per short line
    assert json.loads(lines_of(path)[2])["prev_hash"] == long["hash"]
    assert verify_file(path).ok


# -- events ---------------------------------------------------------------------------------

def all_events() -> list[dict]:
    full = {"reason": "invalid_signature", "identity": "id", "peer_sha256": "ab" * 32,
            "tenant_id": "t", "kid": "k", "execution_fingerprint": "4a" * 32,
            "attestation_hash": "74" * 32, "detail": "d"}
    out = [make_event(0), make_event(1),
           request_event(action="query.rejected", outcome="failure", category=["iam"],
                         status=403, request_id="r", now=NOW, **full),
           request_event(action="feedback.issued", outcome="success", category=["web"],
                         status=200, request_id="r", now=NOW),
           feedback_event(outcome="success", request_id="r", status=200, tenant_id="t",
                          kid="vv-2026", nonce="n1.srv", adjustments=2, now=NOW)]
    out += [feedback_event(outcome="failure", reason=code, request_id="r", kid="k",
                           nonce="n1.srv", detail="x", now=NOW) for code in FEEDBACK_CATEGORIES]
    return out


def test_builders_take_explicit_keywords_only() -> None:
    for builder in (request_event, feedback_event):
        kinds = {p.kind for p in inspect.signature(builder).parameters.values()}
        assert kinds == {inspect.Parameter.KEYWORD_ONLY}
    with pytest.raises(TypeError):
        request_event(action="telemetry.accepted", outcome="success", category=["web"],
                      status=202, request_id="r", now=NOW, body=b"{}")


def test_events_never_carry_secrets_or_bodies(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl", fsync=False) as log:
        for event in all_events():
            written = log.append(event)
            assert not FORBIDDEN & set(written)
            nulls = {k for k, v in written.items() if v is None}
            assert nulls <= {"tenant_id", "kid", "execution_fingerprint"}


@pytest.mark.parametrize("engine", [ReferenceValidators(), Validators()], ids=["ref", "hot"])
def test_events_validate_against_the_schema(tmp_path: Path, engine) -> None:
    with AuditLog(tmp_path / "a.jsonl", fsync=False) as log:
        for event in map(log.append, all_events()):
            assert isinstance(event["event.category"], list)  # the ECS array form
            engine.validate("audit_event", event)
        with pytest.raises(SchemaError):  # the schema is not vacuous for our events
            engine.validate("audit_event", {**event, "body_b64": "e30="})


def test_timestamp_is_rfc3339_utc_milliseconds() -> None:
    assert rfc3339_ms(NOW) == "2026-11-23T14:52:49.163Z"
    assert rfc3339_ms(0.9999) == "1970-01-01T00:00:00.999Z"  # truncated, never rounded up
    assert rfc3339_ms(1_795_445_569) == "2026-11-23T14:52:49.000Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", make_event(0)["@timestamp"])


def test_event_shape() -> None:
    rejected = make_event(1)
    assert rejected["event.category"] == ["authentication"] and rejected["event.kind"] == "event"
    assert rejected["event.reason"] == "invalid_signature" and "attestation_measurement_hash" \
        not in rejected
    assert rejected["tenant_id"] is None  # required by the schema: null until known
    fb = feedback_event(outcome="failure", reason="tenant_mismatch", request_id="r",
                        nonce="n.s", detail="line1\nline2", now=NOW)
    assert (fb["event.action"], fb["event.category"], fb["feedback.nonce"], fb["message"]) == (
        "feedback.rejected", ["iam"], "n.s", "line1 line2")
    assert feedback_event(outcome="success", request_id="r", now=NOW)["event.action"] == (
        "feedback.applied")


BAD_REQUEST_EVENTS = [
    ("failure-without-reason", {"outcome": "failure"}),
    ("outcome-maybe", {"outcome": "maybe"}),
    ("category-string", {"category": "web"}),
    ("category-empty", {"category": []}),
    ("status-99", {"status": 99}),
    ("status-bool", {"status": True}),
    ("action-spaces", {"action": "telemetry accepted"}),
    ("request-id-empty", {"request_id": ""}),
]


@pytest.mark.parametrize("change", [c for _, c in BAD_REQUEST_EVENTS],
                         ids=[n for n, _ in BAD_REQUEST_EVENTS])
def test_request_event_refuses_bad_input(change: dict) -> None:
    args = {"action": "telemetry.accepted", "outcome": "success", "category": ["web"],
            "status": 202, "request_id": "r", "now": NOW}
    request_event(**args)
    with pytest.raises(ValueError):
        request_event(**{**args, **change})


@pytest.mark.parametrize("args", [{"outcome": "failure", "reason": "not_a_code"},
                                  {"outcome": "failure"},
                                  {"outcome": "success", "reason": "unknown_kid"}])
def test_feedback_event_refuses_bad_input(args: dict) -> None:
    with pytest.raises(ValueError):
        feedback_event(request_id="r", now=NOW, **args)


# -- the sink -------------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def info(self, event: str, **kw: object) -> None:
        self.calls.append((event, kw))


def test_sink_appends_and_summarises(tmp_path: Path) -> None:
    path, rec = tmp_path / "s.jsonl", Recorder()
    with AuditSink(path, fsync=False, logger=rec) as sink:
        sink.emit(make_event(1))
    assert verify_file(path).lines == 1
    (action, kw), = rec.calls
    assert action == "telemetry.rejected"
    assert kw["reason"] == "invalid_signature" and kw["status"] == 401
    assert kw["hash"] == json.loads(path.read_bytes())["hash"][:16]


def test_sink_default_logger_writes_one_line_to_stderr(tmp_path: Path, capsys) -> None:
    with AuditSink(tmp_path / "s.jsonl", fsync=False) as sink:
        sink.emit(make_event(0))
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "telemetry.accepted" in err and "request_id='req-0'" in err


def test_new_file_is_not_world_readable(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        AuditLog(tmp_path / "p.jsonl").close()
    finally:
        os.umask(old)
    assert (tmp_path / "p.jsonl").stat().st_mode & 0o777 == 0o640


# -- one parser for every reader (PROTOCOL.md §3 [v1.1]): integers are signed 64-bit ----------

def _chained_line(prev: str, **extra: object) -> bytes:
    """A line with a correct ``prev_hash`` and ``hash`` (what a forger or a bug could write)."""
    event = {**make_event(5), **extra, "prev_hash": prev}
    event["hash"] = chain.event_hash(event)
    return chain.dumps(event) + b"\n"


@pytest.mark.parametrize("value", [2**63, 2**64 - 1, -(2**63) - 1, 10**308])
def test_line_with_integer_beyond_64_bits_breaks_the_chain(five: Path, value: int) -> None:
    five.write_bytes(five.read_bytes() + _chained_line(verify_file(five).last_hash, n=value))
    result = verify_file(five)
    assert (result.ok, result.first_bad_line) == (False, 6)
    assert result.reason == "not strict canonical JSON (integer_out_of_range)"


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1])
def test_event_with_integer_beyond_64_bits_is_never_written(five: Path, value: int) -> None:
    before = five.read_bytes()
    with AuditLog(five) as log:
        with pytest.raises(AuditError, match="integer_out_of_range"):
            log.append({**make_event(5), "n": value})
        log.append({**make_event(6), "n": 2**63 - 1})  # the chain stays appendable
    assert five.read_bytes().startswith(before)
    assert verify_file(five).lines == 6


# -- event.sequence: the line's 1-based position, continued across reopen (issue 10) ------

def test_every_line_carries_its_position_as_event_sequence(five: Path) -> None:
    assert [json.loads(line)["event.sequence"] for line in lines_of(five)] == [1, 2, 3, 4, 5]
    with AuditLog(five, fsync=False) as log:  # a new process continues from the last line
        assert log.append({**make_event(5), "event.sequence": 99})["event.sequence"] == 6
    assert verify_file(five).ok


def test_a_file_written_before_event_sequence_continues_at_its_line_count(
        tmp_path: Path) -> None:
    path, prev, legacy = tmp_path / "legacy.jsonl", ZEROS, []
    for i in range(3):  # lines as the chain wrote them before issue 10: no sequence
        event = {**make_event(i), "prev_hash": prev}
        event["hash"] = prev = reference_hash(event)
        legacy.append(chain.dumps(event) + b"\n")
    path.write_bytes(b"".join(legacy))
    with AuditLog(path, fsync=False) as log:
        assert log.append(make_event(3))["event.sequence"] == 4
        assert log.append(make_event(4))["event.sequence"] == 5
    assert verify_file(path).ok and verify_file(path).lines == 5


def test_a_sequence_that_is_not_the_line_position_breaks_the_chain(five: Path) -> None:
    five.write_bytes(five.read_bytes() + _chained_line(verify_file(five).last_hash,
                                                       **{"event.sequence": 7}))
    result = verify_file(five)
    assert (result.ok, result.first_bad_line) == (False, 6)
    assert "event.sequence is 7, not the line's position 6" in result.reason


def test_every_event_has_its_own_event_id() -> None:
    """ECS ``event.id``: what recovery from the store's audit outbox matches on."""
    ids = [e["event.id"] for e in all_events() + all_events()]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f-]{36}", i) for i in ids)
