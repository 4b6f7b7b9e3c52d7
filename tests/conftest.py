"""Shared fixtures: vector files, a real redis-server on a free loopback port, a real
Redis Cluster (3 masters + 3 replicas), stores."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hangdump import Watchdog, item_timeout, real_stderr_fd
from redis.cluster import RedisCluster

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"


# -- a test nearing its timeout: what it waits on, on stderr (tests/hangdump.py) ---------

def pytest_configure(config: pytest.Config) -> None:
    config.stash[WATCHDOG] = Watchdog(real_stderr_fd(config))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    watchdog = item.config.stash.get(WATCHDOG, None)
    if watchdog is not None:  # setup, call and teardown: as pytest-timeout's own timer
        watchdog.arm(item.nodeid, item_timeout(item))
    try:
        return (yield)
    finally:
        if watchdog is not None:
            watchdog.disarm()


WATCHDOG = pytest.StashKey[Watchdog]()


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


# -- Redis Cluster: ``redis-server`` processes in cluster mode on loopback ports (AOF on,
# fsync always, ``noeviction``), joined by ``redis-cli --cluster create``;
# ``cluster-node-timeout`` 1000 ms so that a killed master is failed over in about 2 s.
NODE_TIMEOUT_MS = 1000


class ClusterNodeServer(RedisServer):
    """One cluster node: its own data port and cluster bus port (``cluster-port``: the
    default port + 10000 may be past 65535 for an ephemeral port)."""

    def __init__(self, workdir: Path, node_timeout_ms: int) -> None:
        self.bus_port = free_port()
        super().__init__(workdir, ("--cluster-enabled", "yes",
                                   "--cluster-config-file", "nodes.conf",
                                   "--cluster-port", str(self.bus_port),
                                   "--cluster-node-timeout", str(node_timeout_ms),
                                   "--maxmemory-policy", "noeviction",
                                   "--repl-diskless-sync-delay", "0"))

    def kill9(self) -> None:
        """SIGKILL: no shutdown, no last write; the process is gone at once."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


class RedisClusterServers:
    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        self.nodes = [ClusterNodeServer(workdir / f"node{i}", node_timeout_ms)
                      for i in range(masters * (1 + replicas))]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """Names one node (any: the client discovers the others)."""
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not installed (apt-get install -y redis-tools)")
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        self.wait_ok()
        self.wait_replicated()

    def wait_replicated(self, timeout: float = 60.0) -> None:
        """Until every master has its replicas online (their first sync done; slow on a
        machine busy with other suites: the deadline is generous)."""
        deadline = time.monotonic() + timeout
        online: list[int] = []
        while time.monotonic() < deadline:
            infos = [m.client().info("replication") for m in self.masters()]
            online = [sum(1 for k, v in i.items() if k.startswith("slave")
                          and isinstance(v, dict) and v.get("state") == "online")
                      for i in infos]
            if len(infos) * (1 + self.replicas) == len(self.nodes) and all(
                    n >= self.replicas for n in online):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the Redis Cluster's replicas did not come online in {timeout:.0f} "
                           f"s (masters {len(online)}, replicas online per master {online})")

    def wait_ok(self, timeout: float = 30.0) -> float:
        """Seconds until every running node says ``cluster_state:ok`` and the masters
        cover every slot with the expected replicas known."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                states = [n.client().cluster("info") for n in self.nodes if n.proc]
                if all(s["cluster_state"] == "ok" for s in states):
                    return time.monotonic() - t0
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def client(self) -> RedisCluster:
        live = next(n for n in self.nodes if n.proc is not None)
        return RedisCluster(host="127.0.0.1", port=live.port, socket_timeout=5)

    def masters(self) -> list[ClusterNodeServer]:
        """The running nodes that are masters now (roles change on failover)."""
        out = []
        for n in self.nodes:
            if n.proc is not None and n.client().info("replication")["role"] == "master":
                out.append(n)
        return out

    def node_of(self, key: str) -> ClusterNodeServer:
        """The master serving ``key``'s slot now."""
        with self.client() as rc:
            node = rc.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == int(node.port))

    def flushall(self) -> None:
        """Empty every master, then wait until each one's replicas have it too."""
        for node in self.masters():
            with node.client() as r:
                r.flushall()
                r.execute_command("WAIT", self.replicas, 2000)

    def provision(self, prefix: str = "fedgate") -> None:
        """Declare the empty store new (epoch 0, docs/STORES.md "Store amnesia")."""
        with self.client() as rc:
            rc.hsetnx(f"{prefix}:schema", "epoch", "0|provisioned")


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


@pytest.fixture(scope="session")
def redis_cluster_servers(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One 3 + 3 cluster for the session (it takes ~2 s to come up)."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster_servers: RedisClusterServers) -> str:
    """URL of one node of the session's cluster, every master emptied before the test."""
    redis_cluster_servers.flushall()
    redis_cluster_servers.provision()
    return redis_cluster_servers.url


@pytest.fixture
def make_cluster(tmp_path: Path):
    """Clusters of the test's own (their masters may be killed), provisioned."""
    clusters = []

    def start(**kwargs) -> RedisClusterServers:
        cluster = RedisClusterServers(tmp_path / f"cluster{len(clusters)}", **kwargs)
        clusters.append(cluster)
        cluster.start()
        cluster.provision()
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def sqlite_spec(sqlite_url: str) -> tuple[str, dict]:
    return sqlite_url, {}


@pytest.fixture
def redis_spec(redis_url: str) -> tuple[str, dict]:
    return redis_url, {}


@pytest.fixture
def redis_cluster_spec(redis_cluster_url: str) -> tuple[str, dict]:
    return redis_cluster_url, {"cluster": True}


@pytest.fixture(params=["sqlite", "redis", "redis_cluster"])
def store_spec(request: pytest.FixtureRequest) -> tuple[str, dict]:
    """The store contract runs once per store, all real: ``(url, open_store options)``."""
    return request.getfixturevalue(f"{request.param}_spec")


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The gateway tests run once per store of one URL (a cluster needs its option)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def new_store(store_spec: tuple[str, dict]):
    """A function that builds (not opens) a store of the test's kind."""
    from gateway.store import open_store

    url, options = store_spec
    return lambda: open_store(url, **options)


@pytest.fixture
async def any_store(new_store):
    """An open store of each kind (``store_spec``: sqlite, redis, redis_cluster), closed
    after the test (the store contract's modules use it as their ``store``)."""
    s = new_store()
    await s.open()
    yield s
    await s.close()


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
