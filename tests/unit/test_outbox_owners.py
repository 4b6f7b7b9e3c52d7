"""Who recovers which audit outbox at start-up (gateway/http/outbox.py), and how far back
recovery looks in the chain (audit/recovery.py)."""

from __future__ import annotations

from audit import AuditLog
from audit.recovery import find_event_ids, oldest_minus
from gateway.http.outbox import owners_to_recover

PENDING = {"n/0", "n/1", "n/2", "n/3", "n/7"}


def test_one_process_is_worker_0_and_recovers_every_other_owner_of_its_node() -> None:
    assert owners_to_recover("n", 0, 1, PENDING) == ["n/0", "n/1", "n/2", "n/3", "n/7"]


def test_with_workers_the_first_recovers_the_owners_no_live_worker_has() -> None:
    assert owners_to_recover("n", 1, 2, PENDING) == ["n/1", "n/0", "n/3", "n/7"]
    assert owners_to_recover("n", 2, 2, PENDING) == ["n/2"]  # only its own


def test_recovery_finds_ids_from_the_end_and_stops_at_since(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, fsync=False) as log:
        log.append_many([{"@timestamp": f"2026-01-01T00:{m:02d}:00.000Z", "event.id": f"e{m}"}
                         for m in range(30)])
    assert find_event_ids(path, {"e29", "e25", "nope"}, None) == {"e29", "e25"}
    since = oldest_minus(["2026-01-01T00:20:00.000Z"])  # 5 minutes before: 00:15
    assert since == "2026-01-01T00:15:00.000Z"
    assert find_event_ids(path, {"e16", "e3"}, since) == {"e16"}  # e3 is older: not read
