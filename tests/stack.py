"""A whole gateway on disk for tests: dev PKI, keys, TOML config; run in-process or as
``fedgate serve`` subprocesses; mTLS clients per identity. Everything real: TLS over
loopback sockets, the project's own PKI code, a real SQLite file or redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from lab import CONFIG, IDENTITY, KEYS, TENANT, TENANT_B

from common.tls import client_context
from fedgate.pki import init_pki
from gateway.http.server import start_gateway
from keyring.ed25519 import PrivateKey
from keyring.keys import save_jwks

ROOT = Path(__file__).resolve().parent.parent
FEEDBACK_SEED = bytes.fromhex("8229f12383c61f56c64c8e77f0cddc9dfe00c9f8ae0770e27d36288a79ae7bf3")
IDENTITIES = [IDENTITY, "spectrastrike-other"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


class Stack:
    #: defaults a subclass may change: tenants per identity, producer keyring, [policy] rules
    TENANTS = {IDENTITY: [TENANT], "spectrastrike-other": [TENANT_B]}
    KEYRING = KEYS
    POLICY_RULES: Path | None = None

    def __init__(self, root: Path, store_url: str, *, tenants: dict | None = None,
                 keys=None, policy_rules: Path | None = None, server: dict | None = None,
                 store: dict | None = None, hsm=None, **security) -> None:
        """``tenants``: identity → its tenants; ``keys``: the producer keyring;
        ``policy_rules``: a rules file for the feedback policy (defaults: the class's);
        ``server``: extra [server] keys; ``store``: extra [store] keys (``cluster``…);
        ``hsm``: a tests/hsm.py ``SoftHsm`` whose token ``fedgate-feedback`` holds the
        feedback key (object ``vv-fb-2026``): the gateway signs through PKCS#11 instead of
        the PEM file."""
        self.root = root
        self.hsm = hsm
        self.server_options = dict(server or {})  # extra [server] keys
        self.store_url = store_url
        self.store_options = dict(store or {})  # extra [store] keys: open_store's options
        self.port = free_port()
        self.tenants = tenants or self.TENANTS
        self.policy_rules = policy_rules if policy_rules is not None else self.POLICY_RULES
        self.pki = init_pki(root / "certs", IDENTITIES)
        (root / "keys").mkdir()
        save_jwks(root / "keys" / "producers.jwks.json", keys or self.KEYRING)
        (root / "keys" / "feedback.pem").write_bytes(PrivateKey(FEEDBACK_SEED).to_pem())
        self.audit_path = root / "audit" / "gateway-audit.jsonl"
        self.config_path = root / "gateway.toml"
        self.write_config(**security)
        self.procs: list[subprocess.Popen] = []

    def pin(self, identity: str = IDENTITY) -> str:
        return self.pki.identities[identity].sha256

    def write_config(self, **security) -> None:
        lines = [f"{k} = {toml_value(v)}" for k, v in security.items()]
        lines += [
            'producer_keyring = "keys/producers.jwks.json"',
            (f'feedback_key = "{self.hsm.uri("fedgate-feedback", "vv-fb-2026")}"'
             if self.hsm is not None else 'feedback_key = "keys/feedback.pem"'),
            'feedback_kid = "vv-fb-2026"',
            "", "[server]", 'host = "127.0.0.1"', f"port = {self.port}",
            'tls_cert = "certs/gateway.crt"', 'tls_key = "certs/gateway.key"',
            'client_ca = "certs/ca.crt"',
            *(f"{k} = {toml_value(v)}" for k, v in self.server_options.items()),
            "", "[store]", f"url = {toml_value(self.store_url)}",
            *(f"{k} = {toml_value(v)}" for k, v in self.store_options.items()),
            "", "[audit]", f"path = {toml_value(str(self.audit_path))}",
        ]
        if self.policy_rules is not None:
            lines += ["", "[policy]", f"rules = {toml_value(str(self.policy_rules))}"]
        for name in IDENTITIES:
            lines += ["", f"[identities.{name}]", f"pins = [{toml_value(self.pin(name))}]",
                      f"tenants = {toml_value(self.tenants[name])}"]
        lines += ["", "[operator_tenants]"]
        lines += [f"{op} = {toml_value(t)}" for op, t in CONFIG["operator_tenants"].items()]
        if self.hsm is not None:
            lines += [self.hsm.toml()]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ssl(self, identity: str | None = IDENTITY):
        certs = self.pki.identities.get(identity) if identity else None
        return client_context(self.pki.ca.cert, certs.cert if certs else None,
                              certs.key if certs else None)

    def session(self, identity: str | None = IDENTITY) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl(identity)))

    # -- in-process server ----------------------------------------------------------
    async def start(self, clock=time.time) -> web.AppRunner:
        return await start_gateway(self.config_path, clock=clock)

    @contextlib.asynccontextmanager
    async def running(self, clock=time.time):
        """The in-process gateway for the duration of a ``with`` block."""
        runner = await self.start(clock=clock)
        try:
            yield runner
        finally:
            await runner.cleanup()

    # -- `fedgate serve` subprocesses --------------------------------------------------
    def spawn(self, *extra: str, fd_soft_limit: int | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """A `fedgate serve` process; its output goes to ``serve.log`` (a pipe nobody
        reads would fill up and stall the gateway under load). ``fd_soft_limit``: start
        it with that soft RLIMIT_NOFILE (the hard one unchanged), like `ulimit -Sn`."""
        def limit_fds() -> None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_soft_limit, hard))

        log = (self.root / "serve.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedgate.cli", "serve", "--config", str(self.config_path),
             *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**(env or os.environ), "PYTHONPATH": str(ROOT)}, start_new_session=True,
            preexec_fn=limit_fds if fd_soft_limit is not None else None)
        log.close()
        self.procs.append(proc)
        return proc

    async def wait_ready(self, timeout: float = 10.0) -> float:
        """Seconds until /readyz answered 200 over mTLS."""
        t0 = time.monotonic()
        async with self.session() as client:
            while time.monotonic() - t0 < timeout:
                try:
                    async with client.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return time.monotonic() - t0
                except (aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError("gateway did not become ready")

    def kill_all(self, sig: int = signal.SIGTERM) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
