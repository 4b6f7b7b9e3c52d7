"""Several gateway replicas sharing one Redis Cluster (issue 11): three ``fedgate serve``
processes, each with its own config, port, audit log and ``[server] node_name``, on the
real 3 + 3 cluster, over real mTLS."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from lab import TELEMETRY_BODY, Lab, body_for
from stack import Stack, free_port

from gateway.feedback.policy import DEFAULT_RULES_FILE
from schemas.routes import QUERY_PATH, TELEMETRY_PATH

pytestmark = pytest.mark.redis

LAB = Lab(None)
FP = "c3" * 32
REPLICAS = ("replica-a", "replica-b", "replica-c")


class Replicas:
    """One PKI, keyring and policy; one config (port, node_name, audit log) per replica."""

    def __init__(self, root: Path, cluster_url: str) -> None:
        self.stack = Stack(root, cluster_url, policy_rules=DEFAULT_RULES_FILE,
                           store={"cluster": True})
        self.urls: dict[str, str] = {}
        self.audit: dict[str, Path] = {}
        for name in REPLICAS:
            st = self.stack
            st.port, st.server_options["node_name"] = free_port(), name
            st.audit_path = root / "audit" / f"{name}.jsonl"
            st.config_path = root / f"{name}.toml"
            st.write_config()
            st.spawn()
            self.urls[name], self.audit[name] = st.url, st.audit_path

    async def wait_ready(self) -> None:
        for url in self.urls.values():
            self.stack.port = int(url.rsplit(":", 1)[1])
            await self.stack.wait_ready(timeout=30)

    async def post(self, client, replica: str, path: str, headers: dict, body: bytes):
        async with client.post(self.urls[replica] + path, data=body, headers=headers) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def replicas(tmp_path, redis_cluster_url):
    reps = Replicas(tmp_path, redis_cluster_url)
    try:
        await reps.wait_ready()
        yield reps
    finally:
        reps.stack.kill_all()


def critical_finding(now: int) -> tuple[dict, bytes]:
    """Telemetry that the default rules turn into ``isolate`` for FP."""
    body = copy.deepcopy(TELEMETRY_BODY)
    body["execution_hash"] = FP
    body["payload"].update(severity="critical", mitre_tactics=["TA0006"])
    body["payload"]["attributes"].update(
        execution_fingerprint=FP,
        attestation_measurement_hash=hashlib.sha256(b"attestation").hexdigest())
    return LAB.signed(TELEMETRY_PATH, body, ts=now)


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_replicas_share_one_cluster(replicas: Replicas) -> None:
    """24 racers send one signed request to three replicas at once: exactly one 202.
    A finding taken by replica A is in the feedback answered by replica B. Each
    replica's audit trail holds the events of the requests it answered."""
    race = LAB.signed(ts=int(time.time()))
    async with replicas.stack.session() as client:
        for name in REPLICAS:  # each one answers on its own (else the race proves nothing)
            status, answer = await replicas.post(client, name, TELEMETRY_PATH,
                                                 *LAB.signed(ts=int(time.time())))
            assert status == 202, (name, answer)
        answers = await asyncio.gather(*(
            replicas.post(client, REPLICAS[i % 3], TELEMETRY_PATH, *race) for i in range(24)))
        statuses = Counter(status for status, _ in answers)
        assert statuses == Counter({202: 1, 409: 23}), answers
        assert {p["error"] for s, p in answers if s == 409} == {"replayed_nonce"}
        winner = next(REPLICAS[i % 3] for i, (s, _) in enumerate(answers) if s == 202)
        accepted_id = next(p["request_id"] for s, p in answers if s == 202)

        status, taken = await replicas.post(client, "replica-a", TELEMETRY_PATH,
                                            *critical_finding(int(time.time())))
        assert status == 202, taken
        query = LAB.signed(QUERY_PATH, body_for(QUERY_PATH), ts=int(time.time()))
        status, answer = await replicas.post(client, "replica-b", QUERY_PATH, *query)
        assert status == 200, answer
        decided = {a["execution_fingerprint"]: a["action"] for a in answer["data"]}
        assert decided[FP] == "isolate"

    replicas.stack.kill_all()  # the audit logs are complete once the processes stopped
    trails = {name: events(path) for name, path in replicas.audit.items()}
    accepted = {name: {e["request_id"] for e in trail
                       if e["event.action"] == "telemetry.accepted"}
                for name, trail in trails.items()}
    assert accepted_id in accepted[winner]
    assert taken["request_id"] in accepted["replica-a"]
    assert [len(a) for a in accepted.values()] == [1 + (n == winner) + (n == 'replica-a')
                                                for n in REPLICAS]
    named = {name: {e.get("service.node.name") for e in trail}
             for name, trail in trails.items()}
    assert named == {name: {name} for name in REPLICAS}  # each trail names its replica

