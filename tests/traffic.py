"""Signed traffic for the resilience tests (issue 10): clients that keep sending
telemetry, each request with its own nonce, and the checks run afterwards on the store
and the audit log: nothing answered 202 is lost, nothing unanswered is half-written.

Every outcome is kept: the status (202, 503, ...) or ``None`` for no answer (connection
refused, reset, closed before the answer).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from lab import TENANT, Lab
from stack import Stack

from audit import verify_file
from gateway.store import open_store
from schemas.routes import TELEMETRY_PATH

LAB = Lab(None)


@dataclass
class Sent:
    headers: dict
    body: bytes
    status: int | None = None  # None: no answer
    answer: dict = field(default_factory=dict)
    error: str | None = None  # the body's error code, or the client-side exception
    started: float = 0.0  # time.monotonic() when sent / answered
    done: float = 0.0


def signed_now() -> tuple[dict, bytes]:
    return LAB.signed(ts=int(time.time()))


async def post(client: aiohttp.ClientSession, stack: Stack, sent: Sent) -> Sent:
    sent.started = time.monotonic()
    try:
        async with client.post(stack.url + TELEMETRY_PATH, data=sent.body,
                               headers=sent.headers) as resp:
            sent.status, sent.answer = resp.status, await resp.json()
            sent.error = sent.answer.get("error")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        sent.status, sent.error = None, type(exc).__name__
    sent.done = time.monotonic()
    return sent


class Traffic:
    """``clients`` concurrent senders, each on its own keep-alive session, until stopped."""

    def __init__(self, stack: Stack, clients: int = 4, pause_s: float = 0.0) -> None:
        self.stack, self.clients, self.pause_s = stack, clients, pause_s
        self.sent: list[Sent] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def _client(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.stack.ssl()), timeout=timeout) as client:
            while not self._stop.is_set():
                sent = Sent(*signed_now())
                self.sent.append(sent)
                await post(client, self.stack, sent)
                if sent.status != 202 or self.pause_s:  # no busy loop on refusals
                    await asyncio.sleep(self.pause_s or (0.1 if sent.status is None else 0.02))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until(self, check, timeout_s: float = 20.0) -> None:
        """Keep sending until ``check(self)`` holds (a deadline for "eventually")."""
        deadline = time.monotonic() + timeout_s
        while not check(self):
            assert time.monotonic() < deadline, f"not reached within {timeout_s} s: " \
                f"{self.counts()}"
            await asyncio.sleep(0.02)

    def counts(self) -> Counter:
        return Counter("no answer" if s.status is None else s.status for s in self.sent)

    def with_status(self, status: int | None) -> list[Sent]:
        return [s for s in self.sent if s.status == status]

    def since(self, status: int, after: float) -> int:
        """How many requests sent at or after ``after`` (monotonic) were answered ``status``."""
        return sum(1 for s in self.sent if s.status == status and s.started >= after)

    def first(self, status: int, after: float) -> Sent | None:
        """The first request sent at or after ``after`` (monotonic) answered ``status``."""
        return min((s for s in self.sent if s.status == status and s.started >= after),
                   key=lambda s: s.done, default=None)


async def stored_findings(store_url: str, ids: list[str],
                          **options) -> dict[str, dict | None]:
    """finding_id → the stored record (None: absent), read with the store's own API."""
    store = open_store(store_url, **options)
    await store.open()
    try:
        return {i: (json.loads(r) if (r := await store.get_record("finding", i, TENANT))
                    else None) for i in ids}
    finally:
        await store.close()


async def stored_request_ids(store_url: str, **options) -> Counter:
    """request_id → how many stored findings carry it (read with the store's own API)."""
    store = open_store(store_url, **options)
    await store.open()
    try:
        records = await store.list_records("finding", TENANT, limit=1_000_000)
        return Counter(json.loads(r)["request_id"] for r in records)
    finally:
        await store.close()


async def count_findings(store_url: str, **options) -> int:
    store = open_store(store_url, **options)
    await store.open()
    try:
        return len(await store.list_records("finding", TENANT, limit=1_000_000))
    finally:
        await store.close()


def audit_events(path: Path) -> list[dict]:
    """The audit log's events, after checking its whole hash chain."""
    result = verify_file(path)
    assert result.ok, result
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def accepted_ids(events: list[dict]) -> Counter:
    """request_id → how many ``telemetry.accepted`` events name it."""
    return Counter(e["request_id"] for e in events if e["event.action"] == "telemetry.accepted")


async def replay_all(stack: Stack, sent: list[Sent], clients: int = 8) -> list[Sent]:
    """Each request sent again, exactly as it was (same nonce, same bytes); in order."""
    again = [Sent(s.headers, s.body) for s in sent]
    sessions = [stack.session() for _ in range(clients)]

    async def lane(i: int) -> None:
        for s in again[i::clients]:
            await post(sessions[i], stack, s)

    try:
        await asyncio.gather(*(lane(i) for i in range(clients)))
    finally:
        for session in sessions:
            await session.close()
    return again


async def check_nothing_lost(stack: Stack, traffic: Traffic, audit_paths: list[Path], *,
                             lost_replies: bool = False) -> dict:
    """On a running gateway (restarted on the same store and audit log):

    * every 202 is in the store (``get_record``) and its replay is refused 409;
    * every request without an answer is either fully there (its replay is a 409 naming
      a stored record with exactly one ``telemetry.accepted`` event) or absent (its replay
      is accepted now);
    * every request refused 503 wrote nothing: sent again now, it is accepted (with
      ``lost_replies``: or the store committed it and the gateway never got the reply:
      Redis killed after the script ran; counted, its record has no accepted event);
    * the audit chains verify and hold exactly one accepted event per stored record.

    Returns the figures for docs/RESILIENCE.md."""
    accepted = traffic.with_status(202)
    stored = await stored_findings(stack.store_url, [s.answer["finding_id"] for s in accepted],
                                   **stack.store_options)
    lost = [i for i, record in stored.items() if record is None]
    assert not lost, f"{len(lost)} findings answered 202 are missing"
    replays = await replay_all(stack, accepted)
    assert Counter(r.status for r in replays) == Counter({409: len(accepted)})
    unanswered = traffic.with_status(None)
    again = await replay_all(stack, unanswered)
    assert {r.status for r in again} <= {202, 409}, Counter(r.status for r in again)
    present = [r for r in again if r.status == 409]
    events = [e for p in audit_paths for e in audit_events(p)]
    ids = accepted_ids(events)
    half = [r for r in present if ids[r.answer.get("duplicate_of")] != 1]
    assert not half, f"{len(half)} unanswered requests stored without exactly one event"
    assert all(ids[s.answer["request_id"]] == 1 for s in accepted)
    refused = await replay_all(stack, traffic.with_status(503))  # a 503 wrote nothing:
    stored_503 = [r for r in refused if r.status == 409]  # ... unless its reply was lost
    assert all(r.status == 202 for r in refused if r not in stored_503)
    assert lost_replies or not stored_503, Counter((r.status, r.error) for r in refused)
    ids = accepted_ids([e for p in audit_paths for e in audit_events(p)])  # its nonce free
    total = await count_findings(stack.store_url, **stack.store_options) - len(stored_503)
    assert sum(ids.values()) == len(ids) == total  # one event per stored record, no more
    return {"sent": len(traffic.sent), **{str(k): v for k, v in traffic.counts().items()},
            "unanswered_present": len(present), "unanswered_absent": len(again) - len(present),
            "503_but_stored": len(stored_503), "lost": len(lost), "half_written": len(half)}


async def exited(proc: subprocess.Popen, timeout_s: float = 20.0) -> int:
    """The exit status, once the process is gone (a deadline for "eventually")."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"still running {timeout_s} s after the signal"
        await asyncio.sleep(0.01)
    return proc.returncode


async def outbox_events(store_url: str) -> list[dict]:
    """Every event still in this host's audit outboxes (docs/AUDIT.md *Outbox*)."""
    store = open_store(store_url)
    await store.open()
    try:
        owners = await store.outbox_owners(socket.gethostname())
        return [e for o in sorted(owners) for entry in await store.outbox_read(o)
                for e in json.loads(entry.events)]
    finally:
        await store.close()
