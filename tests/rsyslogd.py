"""A real rsyslogd (Debian package) on a free loopback port, for the SIEM shipper tests.

Started as ``rsyslogd -n -f CONF -i PIDFILE`` with its own work directory: imtcp (plain
TCP, octet-counted framing on by default) or imtcp with the gtls driver (RFC 5425), every
message written by omfile as one JSON object per line (``received()`` parses them). Never
the system service: nothing outside the temporary directory is touched.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port

TEMPLATE = """
template(name="fedgate_json" type="list" option.jsonf="on") {
  property(outname="pri" name="pri" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}
"""


class Rsyslogd:
    def __init__(self, workdir: Path, *, tls: dict[str, Path] | None = None,
                 auth_mode: str = "anon") -> None:
        self.workdir, self.tls, self.auth_mode = workdir, tls, auth_mode
        self.port = free_port()
        self.out = workdir / "received.jsonl"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def config(self) -> str:
        spool = self.workdir / "spool"
        spool.mkdir(parents=True, exist_ok=True)
        glob = f'global(workDirectory="{spool}" maxMessageSize="64k"'
        mod = 'module(load="imtcp"'
        if self.tls is not None:
            glob += (f' defaultNetstreamDriver="gtls"'
                     f' defaultNetstreamDriverCAFile="{self.tls["ca"]}"'
                     f' defaultNetstreamDriverCertFile="{self.tls["cert"]}"'
                     f' defaultNetstreamDriverKeyFile="{self.tls["key"]}"')
            mod += (f' streamDriver.name="gtls" streamDriver.mode="1"'
                    f' streamDriver.authMode="{self.auth_mode}"')
        return (f"{glob})\n{mod})\n{TEMPLATE}\n"
                f'input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="siem")\n'
                'ruleset(name="siem") {\n'
                f'  action(type="omfile" file="{self.out}" template="fedgate_json")\n'
                "}\n")

    def start(self) -> None:
        exe = shutil.which("rsyslogd")
        if exe is None:
            raise RuntimeError("rsyslogd not installed (apt-get install -y rsyslog "
                               "rsyslog-gnutls)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "rsyslog.conf"
        conf.write_text(self.config(), encoding="utf-8")
        self.starts += 1
        log = open(self.workdir / f"rsyslogd.{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, "-n", "-f", str(conf), "-i", str(self.workdir / "rsyslogd.pid")],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("rsyslogd exited: " + self.logs())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"rsyslogd did not listen on {self.port}: " + self.logs())

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in
                       sorted(self.workdir.glob("rsyslogd.*.log")))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
            self.proc = None

    def received(self) -> list[dict]:
        if not self.out.exists():
            return []
        data = self.out.read_bytes()
        return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]

    def wait_for(self, n: int, timeout: float = 60) -> list[dict]:
        """At least ``n`` messages received (omfile writes in batches), or what there is."""
        deadline = time.monotonic() + timeout
        got = self.received()
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.1)
            got = self.received()
        return got
