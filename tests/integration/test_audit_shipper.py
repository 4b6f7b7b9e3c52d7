"""The SIEM shipper against a real rsyslogd (imtcp; gtls for RFC 5425) on loopback.

What the SIEM received is read back from rsyslog's own output file (one JSON object per
message: PRI, HOSTNAME, APP-NAME, MSGID, STRUCTURED-DATA, MSG as rsyslog parsed them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import threading
import time
from pathlib import Path

import pytest

from audit import AuditLog, request_event
from audit.shipper import ShipError, Shipper, ShipperBusy, ShipState
from fedgate.pki import init_pki
from gateway.config.syslog_config import parse_syslog
from tests.rsyslogd import Rsyslogd
from tests.unit.test_audit_chain import make_event

SEQ = re.compile(r'seq="(\d+)"')


def config(tmp: Path, rs: Rsyslogd, **extra):
    table = {"host": "127.0.0.1", "port": rs.port, "transport": "tcp", "hostname": "gw-1",
             "backoff_initial_s": 0.05, "backoff_max_s": 0.5, "poll_interval_s": 0.02,
             "ack_timeout_s": 5, **extra}
    return parse_syslog(table, tmp, tmp / "audit.jsonl")


def write(path: Path, start: int, n: int) -> list[dict]:
    with AuditLog(path, fsync=False) as log:
        return [log.append(make_event(i)) for i in range(start, start + n)]


def sequences(received: list[dict]) -> list[int]:
    out = []
    for msg in received:
        body = json.loads(msg["msg"])
        assert SEQ.search(msg["sd"]).group(1) == str(body["event.sequence"])
        out.append(body["event.sequence"])
    return out


def deduplicate(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    return [s for s in seqs if not (s in seen or seen.add(s))]


def drain(shipper: Shipper) -> None:
    stop = threading.Event()
    timer = threading.Timer(60, stop.set)  # a hung test fails below, it does not hang
    timer.start()
    try:
        shipper.run(stop, once=True)
    finally:
        timer.cancel()
    assert shipper.lag_events == 0


@pytest.fixture
def rsyslog(tmp_path: Path):
    rs = Rsyslogd(tmp_path / "rsyslog")
    rs.start()
    yield rs
    rs.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return init_pki(tmp_path_factory.mktemp("pki"), ["fedgate-shipper"])


def test_events_arrive_once_in_order_as_rfc5424(tmp_path: Path, rsyslog: Rsyslogd) -> None:
    audit = tmp_path / "audit.jsonl"
    written = write(audit, 0, 120)
    shipper = Shipper(audit, config(tmp_path, rsyslog))
    drain(shipper)
    shipper.close()
    got = rsyslog.wait_for(120)
    assert sequences(got) == list(range(1, 121))
    lines = audit.read_bytes().splitlines()
    for msg, line, event in zip(got, lines, written, strict=True):
        assert msg["msg"].encode() == line  # the audit line itself: the SIEM can re-verify
        assert (msg["hostname"], msg["app"], msg["msgid"]) == ("gw-1", "fedgate",
                                                               event["event.action"])
        # local0 (16): success informational (6), authentication failure warning (4)
        assert msg["pri"] == ("134" if event["event.outcome"] == "success" else "132")
        assert msg["timestamp"] == event["@timestamp"]
    assert ShipState.load(tmp_path / "audit.jsonl.ship-state.json") == ShipState(
        audit.stat().st_size, 120, written[-1]["hash"])
    assert shipper.shipped_total == 120
    assert "fedgate_audit_shipper_lag_events 0" in shipper.metrics_text()


def test_a_restarted_shipper_continues_after_the_last_delivered_event(
        tmp_path: Path, rsyslog: Rsyslogd) -> None:
    audit = tmp_path / "audit.jsonl"
    write(audit, 0, 10)
    first = Shipper(audit, config(tmp_path, rsyslog, batch_max_events=4))
    drain(first)
    with pytest.raises(ShipperBusy):  # exactly one shipper per state file
        Shipper(audit, config(tmp_path, rsyslog))
    first.close()
    write(audit, 10, 5)
    second = Shipper(audit, config(tmp_path, rsyslog))
    assert second.state.sequence == 10
    second.ship_once()
    assert second.lag_events == 0
    second.close()
    assert sequences(rsyslog.wait_for(15)) == list(range(1, 16))


def test_a_broken_chain_is_not_shipped_past(tmp_path: Path, rsyslog: Rsyslogd) -> None:
    audit = tmp_path / "audit.jsonl"
    write(audit, 0, 6)
    lines = audit.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"req-3"', b'"req-X"')  # an edited line 4
    audit.write_bytes(b"".join(lines))
    shipper = Shipper(audit, config(tmp_path, rsyslog, batch_max_events=2))
    drain_error = None
    try:
        drain(shipper)
    except ShipError as exc:
        drain_error = str(exc)
    shipper.close()
    assert drain_error is not None and "line 4: hash mismatch" in drain_error
    assert sequences(rsyslog.wait_for(2)) == [1, 2]
    time.sleep(0.5)  # nothing more arrives
    assert sequences(rsyslog.received()) == [1, 2]


def test_a_replaced_audit_file_stops_the_shipper(tmp_path: Path, rsyslog: Rsyslogd) -> None:
    audit = tmp_path / "audit.jsonl"
    write(audit, 0, 3)
    shipper = Shipper(audit, config(tmp_path, rsyslog))
    drain(shipper)
    shipper.close()
    audit.unlink()
    write(audit, 100, 3)  # a new chain at the same path: its line 3 is another line
    with pytest.raises(ShipError, match="does not hold the shipped line 3"):
        Shipper(audit, config(tmp_path, rsyslog)).ship_once()


def test_the_shipper_follows_fedgate_audit_rotate(tmp_path: Path, rsyslog: Rsyslogd) -> None:
    """A file started by `fedgate audit rotate` continues the chain: the running shipper
    ships the old file to its end and goes on in the new one, sequences continuing; a
    fresh shipper (no state) starts at the new file's first line."""
    from audit.checkpoints import Checkpointer
    from audit.rotate import rotate
    from keyring.ed25519 import PrivateKey

    audit = tmp_path / "audit.jsonl"
    cp = Checkpointer(PrivateKey(bytes([9]) * 32), "audit-k", every_events=1000, every_s=60)
    write(audit, 0, 3)
    shipper = Shipper(audit, config(tmp_path, rsyslog))
    drain(shipper)
    write(audit, 3, 2)  # not yet shipped when the file is rotated
    with AuditLog(audit, fsync=False) as log:
        assert rotate(log, tmp_path / "audit.jsonl.1", cp) == 7  # checkpoint is line 6
    write(audit, 10, 2)
    drain(shipper)  # old file to its end, then the new one
    drain(shipper)
    shipper.close()
    assert sequences(rsyslog.wait_for(9)) == list(range(1, 10))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    again = Shipper(audit, config(tmp_path, rsyslog, state_path=str(fresh / "state.json")))
    drain(again)
    again.close()
    assert sequences(rsyslog.wait_for(12))[9:] == [7, 8, 9]


# -- TLS (RFC 5425) with the dev PKI -----------------------------------------------------

def tls_rsyslog(tmp_path: Path, pki, auth_mode: str = "anon") -> Rsyslogd:
    rs = Rsyslogd(tmp_path / "rsyslog-tls", auth_mode=auth_mode,
                  tls={"ca": pki.ca.cert, "cert": pki.gateway.cert, "key": pki.gateway.key})
    rs.start()
    return rs


def test_tls_with_a_verified_server_certificate(tmp_path: Path, pki) -> None:
    rs = tls_rsyslog(tmp_path, pki)
    try:
        audit = tmp_path / "audit.jsonl"
        write(audit, 0, 30)
        shipper = Shipper(audit, config(tmp_path, rs, transport="tls", ca=str(pki.ca.cert),
                                        server_name="localhost"))
        drain(shipper)
        shipper.close()
        got = rs.wait_for(30)
    finally:
        rs.stop()
    assert sequences(got) == list(range(1, 31))
    assert [m["msg"].encode() for m in got] == audit.read_bytes().splitlines()


def test_tls_refuses_a_server_certificate_from_another_ca(tmp_path: Path, pki) -> None:
    other = init_pki(tmp_path / "other-pki", ["x"])
    rs = tls_rsyslog(tmp_path, pki)
    try:
        audit = tmp_path / "audit.jsonl"
        write(audit, 0, 5)
        cfg = config(tmp_path, rs, transport="tls", ca=str(other.ca.cert),
                     server_name="localhost")
        shipper = Shipper(audit, cfg)
        with pytest.raises(ssl.SSLCertVerificationError):
            shipper.ship_once()
        assert shipper.state.sequence == 0 and shipper.lag_events == 5
        shipper.close()
        assert ShipState.load(cfg.state_path) == ShipState()  # nothing recorded
        time.sleep(0.5)
        assert rs.received() == []
    finally:
        rs.stop()


def test_mutual_tls_with_the_shippers_client_certificate(tmp_path: Path, pki) -> None:
    rs = tls_rsyslog(tmp_path, pki, auth_mode="x509/certvalid")
    try:
        audit = tmp_path / "audit.jsonl"
        write(audit, 0, 4)
        common = {"transport": "tls", "ca": str(pki.ca.cert), "server_name": "localhost"}
        anonymous = Shipper(audit, config(tmp_path, rs, **common))
        with pytest.raises((ssl.SSLError, OSError)):  # the receiver wants a certificate
            anonymous.ship_once()
        anonymous.close()
        client = pki.identities["fedgate-shipper"]
        shipper = Shipper(audit, config(tmp_path, rs, **common, client_cert=str(client.cert),
                                        client_key=str(client.key)))
        drain(shipper)
        shipper.close()
        assert sequences(rs.wait_for(4)) == [1, 2, 3, 4]
    finally:
        rs.stop()


# -- resilience: the receiver stops under load and comes back ------------------------------

def outage(tmp_path: Path, rs: Rsyslogd, pause_s: float) -> dict:
    """Write events continuously; stop rsyslog (SIGTERM) for ``pause_s``; restart it;
    return what was written and received."""
    audit = tmp_path / "audit.jsonl"
    cfg = config(tmp_path, rs, batch_max_events=50, backoff_max_s=1.0)
    log = AuditLog(audit)  # fsync on, as in production
    stop_writing, stop_shipping = threading.Event(), threading.Event()

    def writer() -> None:
        i = 0
        while not stop_writing.is_set():
            log.append(request_event(action="telemetry.accepted", outcome="success",
                                     category=["web"], status=202, request_id=f"r-{i}",
                                     now=time.time()))
            i += 1
            time.sleep(0.002)

    shipper = Shipper(audit, cfg)
    threads = [threading.Thread(target=writer),
               threading.Thread(target=shipper.run, args=(stop_shipping,))]
    for t in threads:
        t.start()
    try:
        while shipper.shipped_total < 200:  # under way before the receiver goes
            time.sleep(0.01)
        rs.stop(signal.SIGTERM)
        written_at_stop, shipped_at_stop = _count(audit), shipper.shipped_total
        time.sleep(pause_s)
        written_at_restart = _count(audit)
        failures_during_outage = shipper.failures
        rs.start()
        restarted = time.monotonic()
        while shipper.state.sequence < _count(audit):
            time.sleep(0.01)
        recovery_s = time.monotonic() - restarted
        time.sleep(1.0)  # keep writing after recovery
        stop_writing.set()
        threads[0].join()
        total = _count(audit)
        while shipper.state.sequence < total:
            time.sleep(0.01)
    finally:
        stop_writing.set()
        stop_shipping.set()
        for t in threads:
            t.join()
        shipper.close()
        log.close()
    got = sequences(rs.wait_for(total))
    return {"written": total, "written_at_stop": written_at_stop,
            "written_during_outage": written_at_restart - written_at_stop,
            "shipped_at_stop": shipped_at_stop, "failures": failures_during_outage,
            "received": got, "recovery_s": recovery_s, "audit": audit}


def _count(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def check_outage(result: dict, pause_s: float) -> None:
    got, total = result["received"], result["written"]
    assert result["written_during_outage"] > 0 and result["failures"] > 0  # a real outage
    assert deduplicate(got) == list(range(1, total + 1))  # every event, in order, once
    for prev, cur in zip(got, got[1:], strict=False):
        assert cur <= prev + 1  # never a gap: a resend restarts at or before the next one
    lines = result["audit"].read_bytes().splitlines()
    assert len(lines) == total
    duplicates = len(got) - total
    summary = {"pause_s": pause_s, "sent": total, "delivered": len(got),
               "duplicates_before_dedup": duplicates, "duplicates_after_dedup": 0,
               "written_during_outage": result["written_during_outage"],
               "delivery_failures": result["failures"],
               "recovery_s": round(result["recovery_s"], 2)}
    print(f"\nresilience: {json.dumps(summary)}")
    out = os.environ.get("FEDGATE_RESILIENCE_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(summary) + "\n")


def test_receiver_stopped_under_load_every_event_arrives(tmp_path: Path,
                                                         rsyslog: Rsyslogd) -> None:
    check_outage(outage(tmp_path, rsyslog, 3.0), 3.0)


@pytest.mark.resilience
@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.environ.get("FEDGATE_RESILIENCE"),
                    reason="30 s outage: `make resilience` (FEDGATE_RESILIENCE=1)")
def test_receiver_stopped_for_30_seconds_every_event_arrives(tmp_path: Path,
                                                             rsyslog: Rsyslogd) -> None:
    check_outage(outage(tmp_path, rsyslog, 30.0), 30.0)


# -- the command: fedgate audit ship --config gateway.toml --------------------------------

def test_fedgate_audit_ship_once_delivers_and_exits(tmp_path: Path, rsyslog: Rsyslogd) -> None:
    from tests.conftest import free_port
    from tests.e2e.test_cli_edges import fedgate, one_error_line

    root = tmp_path / "fed"
    assert fedgate("bootstrap", str(root), "--port", str(free_port())).returncode == 0
    gateway = root / "gateway.toml"
    settings_text = gateway.read_text()
    audit = Path(re.search(r'^path = "(.+)"$', settings_text, re.M).group(1))
    audit = audit if audit.is_absolute() else (root / audit).resolve()
    audit.parent.mkdir(parents=True, exist_ok=True)
    write(audit, 0, 25)
    table = (f'\n[audit.syslog]\nhost = "127.0.0.1"\nport = {rsyslog.port}\n'
             f'transport = "tcp"\nstate_path = "state/ship.json"\n'
             f'metrics_path = "state/ship.prom"\n')
    gateway.write_text(settings_text + table)
    result = fedgate("audit", "ship", "--config", str(gateway), "--once")
    assert result.returncode == 0, result.stderr
    assert "shipped_total=25 lag_events=0 sequence=25" in result.stderr
    assert sequences(rsyslog.wait_for(25)) == list(range(1, 26))
    metrics = (root / "state" / "ship.prom").read_text()
    assert "fedgate_audit_shipped_total 25" in metrics
    assert "fedgate_audit_shipper_lag_events 0" in metrics
    gateway.write_text(settings_text + table.replace("transport", "transprot"))
    line = one_error_line(fedgate("audit", "ship", "--config", str(gateway)))
    assert line.endswith("unknown key 'audit.syslog.transprot'")
