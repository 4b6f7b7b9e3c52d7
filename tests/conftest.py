"""Shared fixtures: vector files, a real redis-server on a free loopback port, stores."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"


def load_vectors(name: str) -> dict:
    """A vector file (copied verbatim from ../shared/vectors; see tests/vectors/README.md)."""
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server process (AOF on, fsync always), started and stopped by tests."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.extra_args = tuple(extra_args)  # appended last: they override the defaults
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not installed (apt-get install -y redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--protected-mode", "yes", "--loglevel", "warning", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def flushall(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(16).startswith(b"+OK")

    def provision(self, prefix: str = "fedgate") -> None:
        """Declare the empty store new (epoch 0, docs/STORES.md "Store amnesia"), or the
        gateway treats it as one that lost its state and refuses its first requests."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(f"HSETNX {prefix}:schema epoch 0|provisioned\r\n".encode())
            assert s.recv(16).startswith(b":")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_redis(tmp_path: Path):
    """Start redis-servers of the test's own (with extra arguments; they may be killed
    and restarted empty), provisioned as new stores unless told otherwise."""
    servers = []

    def start(*args: str, provision: bool = True) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", extra_args=args)
        servers.append(server)
        server.start()
        if provision:
            server.provision()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, emptied before the test."""
    if redis_server.proc is None:  # a test stopped it: bring it back
        redis_server.start()
    redis_server.flushall()
    redis_server.provision()
    return redis_server.url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fedgate.db'}"


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each contract test runs once per store, both real."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
async def store(store_url: str):
    """An open store of each kind (via ``store_url``), closed after the test."""
    from gateway.store import open_store

    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


# -- SoftHSM2 (tests/hsm.py): the PKCS#11 signer against a real token --------------------

FEEDBACK_TOKEN, PRODUCER_TOKEN = "fedgate-feedback", "fedgate-producer"


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory):
    """One SoftHSM2 for the in-process tests, its tokens made before any test loads the
    module: ``fedgate-feedback`` holds the feedback vectors' seeds (objects vv-fb-2026,
    vv-fb-2027), ``fedgate-producer`` the lab producer key (object lab-2026).
    ``SOFTHSM2_CONF`` and the PIN variable are set for the whole session."""
    import hashlib
    import os

    from hsm import PIN, PIN_ENV, SoftHsm

    hsm = SoftHsm(tmp_path_factory.mktemp("softhsm"))
    hsm.init_token(FEEDBACK_TOKEN)
    hsm.init_token(PRODUCER_TOKEN)
    for kid, seed in load_vectors("feedback_v1.json")["feedback_private_key_seed_hex"].items():
        hsm.import_seed(FEEDBACK_TOKEN, kid, bytes.fromhex(seed))
    hsm.import_seed(PRODUCER_TOKEN, "lab-2026", hashlib.sha256(b"lab producer key").digest())
    saved = {k: os.environ.get(k) for k in ("SOFTHSM2_CONF", PIN_ENV)}
    os.environ.update(SOFTHSM2_CONF=str(hsm.conf), **{PIN_ENV: PIN})
    yield hsm
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["file", "pkcs11"])
def feedback_signer(request: pytest.FixtureRequest):
    """kid → the feedback signer for that vector key: the PEM-file signer, or the same seed
    inside the SoftHSM2 token (signing through PKCS#11). Closed after the test."""
    from keyring.ed25519 import PrivateKey
    from keyring.pkcs11 import Pkcs11Config, Pkcs11Signer, parse_uri
    from keyring.signer import FileSigner

    seeds = load_vectors("feedback_v1.json")["feedback_private_key_seed_hex"]
    opened = []

    def make(kid: str):
        if request.param == "file":
            return FileSigner(PrivateKey(bytes.fromhex(seeds[kid])), kid)
        from hsm import PIN

        hsm = request.getfixturevalue("softhsm")
        signer = Pkcs11Signer(Pkcs11Config(hsm.module, PIN),
                              parse_uri(hsm.uri(FEEDBACK_TOKEN, kid)), kid)
        opened.append(signer)
        return signer

    make.kind = request.param
    yield make
    for signer in opened:
        signer.close()


@pytest.fixture(params=["file", "pkcs11"])
def feedback_hsm(request: pytest.FixtureRequest):
    """For a ``Stack(..., hsm=feedback_hsm)``: None (the PEM feedback key) or the session's
    SoftHSM2 (feedback_key = pkcs11:token=fedgate-feedback;object=vv-fb-2026)."""
    return request.getfixturevalue("softhsm") if request.param == "pkcs11" else None
