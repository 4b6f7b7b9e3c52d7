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
