"""gateway.config.settings: the TOML file of PROTOCOL.md §8, with real files in tmp_path."""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT

from common.tomlfile import ConfigError
from gateway.config.config import DEFAULT_MAX_BODY
from gateway.config.settings import (
    AdminSettings,
    GatewaySettings,
    ServerSettings,
    load_keys,
    load_settings,
)
from gateway.logs import LogSettings
from keyring.ed25519 import PrivateKey
from keyring.keys import Key, Keyring, save_jwks

# A verbatim copy of ../shared/examples/gateway.toml (CI has no sibling checkout).
EXAMPLE = ROOT / "tests" / "data" / "gateway.example.toml"
IDENTITY = "producer-a"
TENANT = "10000000-0000-0000-0000-000000000001"
PIN = "ab" * 32
SEED = bytes(range(32))

VALID = f"""\
clock_skew_s = 20
nonce_ttl_s = 100
require_canonical_body = true
allowed_schema_versions = ["1.0", "1.1"]
anchor_attestation = false
rate_limit_per_minute = 600
producer_keyring = "keys/producers.jwks.json"
feedback_key = "keys/fb.pem"
feedback_kid = "vv-fb-2026"

[server]
host = "0.0.0.0"
port = 9443
tls_cert = "certs/gateway.crt"
tls_key = "certs/gateway.key"
client_ca = "certs/ca.crt"
max_body_bytes = 2048
handshake_timeout_s = 3
header_timeout_s = 4.5
idle_timeout_s = 20
max_connections = 500
identity_share = 0.25
shutdown_timeout_s = 7.5

[store]
url = "sqlite:///state/test.db"
busy_timeout_ms = 250

[audit]
path = "logs/audit.jsonl"

[policy]
rules = "policy/rules.toml"

[log]
format = "json"
level = "warning"
access = true

[identities.{IDENTITY}]
pins = ["{PIN}"]
tenants = ["{TENANT}"]

[operator_tenants]
op-001 = "{TENANT}"
"""

# Only what has no default; everything else must come out as documented.
MINIMAL = f"""\
producer_keyring = "keys/producers.jwks.json"
feedback_key = "keys/fb.pem"
feedback_kid = "fb"

[server]
tls_cert = "certs/gateway.crt"
tls_key = "certs/gateway.key"
client_ca = "certs/ca.crt"

[identities.{IDENTITY}]
pins = ["{PIN}"]
tenants = ["{TENANT}"]
"""


def producer_key(kid: str = "p1", identity: str | None = IDENTITY) -> Key:
    return Key(kid=kid, public=PrivateKey(os.urandom(32)).public, identity=identity,
               tenants=frozenset({TENANT}))


def write_tree(root: Path, text: str = VALID, name: str = "gateway.toml") -> Path:
    """The config file plus every file it names, under ``root``."""
    for rel in ("certs/gateway.crt", "certs/gateway.key", "certs/ca.crt", "policy/rules.toml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"placeholder: TLS loading is tested elsewhere\n")
    (root / "keys").mkdir(exist_ok=True)
    save_jwks(root / "keys/producers.jwks.json", Keyring([producer_key()]))
    (root / "keys/fb.pem").write_bytes(PrivateKey(SEED).to_pem())
    cfg = root / name
    cfg.write_text(text, encoding="utf-8")
    return cfg


def sub(old: str, new: str) -> Callable[[str], str]:
    """An edit of the VALID text that fails loudly if VALID no longer has ``old``."""
    def edit(text: str) -> str:
        assert old in text, f"VALID lost {old!r}"
        return text.replace(old, new, 1)
    return edit


def expect_error(cfg: Path, *needles: str, keys: bool = False) -> str:
    with pytest.raises(ConfigError) as err:
        settings = load_settings(cfg)
        if keys:
            load_keys(settings)
    msg = str(err.value)
    assert msg.startswith(f"{cfg}: ") and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# -- valid files --------------------------------------------------------------------------
def test_valid_config_loads_with_paths_relative_to_its_directory(tmp_path, monkeypatch) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    cfg = write_tree(conf)
    monkeypatch.chdir(tmp_path)  # relative to the file, never to the working directory
    s = load_settings("etc/gateway.toml")
    assert isinstance(s, GatewaySettings) and s.path == cfg
    sec = s.security
    assert (sec.clock_skew_s, sec.nonce_ttl_s, sec.max_body_bytes) == (20, 100, 2048)
    assert sec.allowed_schema_versions == {"1.0", "1.1"} and sec.anchor_attestation is False
    assert sec.rate_limit_per_minute == 600 and sec.require_canonical_body is True
    assert sec.identities[IDENTITY].pins == {PIN}
    assert sec.identities[IDENTITY].tenants == {TENANT}
    assert dict(sec.operator_tenants) == {"op-001": TENANT}
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9443)
    assert s.server.tls_cert == conf / "certs/gateway.crt"
    assert s.server.tls_key == conf / "certs/gateway.key"
    assert s.server.client_ca == conf / "certs/ca.crt"
    server = s.server
    assert (server.handshake_timeout_s, server.header_timeout_s, server.idle_timeout_s,
            server.max_connections, server.identity_share) == (3.0, 4.5, 20.0, 500, 0.25)
    assert server.shutdown_timeout_s == 7.5
    assert s.store_url == f"sqlite:///{conf}/state/test.db"
    assert s.store_url.startswith("sqlite:////")  # the store strips "sqlite:///" → absolute
    assert dict(s.store_options) == {"busy_timeout_ms": 250}
    assert s.producer_keyring == conf / "keys/producers.jwks.json"
    assert (s.feedback_key, s.feedback_kid) == (conf / "keys/fb.pem", "vv-fb-2026")
    assert s.audit_path == conf / "logs/audit.jsonl" and s.audit_path.parent.is_dir()
    assert s.policy_rules == conf / "policy/rules.toml"
    assert s.log == LogSettings(format="json", level="warning", access=True)
    assert s.log.merged({"format": "console", "level": None, "access": None}) == LogSettings(
        format="console", level="warning", access=True)  # a flag overrides its key only


def test_defaults_apply(tmp_path) -> None:
    cfg = write_tree(tmp_path, MINIMAL)
    s = load_settings(cfg)
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8443)
    assert s.store_url == f"sqlite:///{tmp_path}/state/fedgate.db"
    assert dict(s.store_options) == {}
    assert s.audit_path == tmp_path / "audit/gateway-audit.jsonl"
    assert s.audit_path.parent.is_dir()  # created at load
    assert s.policy_rules is None
    assert s.log == LogSettings(format="console", level="info", access=False)
    assert ServerSettings(tls_cert=cfg, tls_key=cfg, client_ca=cfg).host == "127.0.0.1"
    assert ServerSettings(tls_cert=cfg, tls_key=cfg, client_ca=cfg).port == 8443
    assert (s.server.handshake_timeout_s, s.server.header_timeout_s, s.server.idle_timeout_s,
            s.server.max_connections, s.server.identity_share) == (10.0, 10.0, 30.0, 4096, 0.5)
    assert s.server.shutdown_timeout_s == 10.0
    assert s.server.node_name == socket.gethostname()  # the replica's default name
    sec = s.security
    assert (sec.clock_skew_s, sec.nonce_ttl_s, sec.max_body_bytes) == (30, 120, DEFAULT_MAX_BODY)
    assert sec.allowed_schema_versions == {"1.0"} and sec.require_canonical_body is True


@pytest.mark.parametrize("url, want", [
    ("sqlite:////var/lib/fedgate/x.db", "sqlite:////var/lib/fedgate/x.db"),
    ("sqlite:///../db/x.db", "sqlite:///{parent}/db/x.db"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("rediss://cache.internal:6380/1", "rediss://cache.internal:6380/1"),
], ids=["sqlite-absolute", "sqlite-relative-dotdot", "redis", "rediss"])
def test_store_urls(tmp_path, url, want) -> None:
    s = load_settings(write_tree(tmp_path, VALID.replace(
        'url = "sqlite:///state/test.db"\nbusy_timeout_ms = 250', f'url = "{url}"')))
    assert s.store_url == want.format(parent=tmp_path.parent)


def test_redis_options_pass_through(tmp_path) -> None:
    text = sub("busy_timeout_ms = 250", 'require_durable = false\nsocket_timeout = 1.5\n'
               'key_prefix = "fg-a"')(sub("sqlite:///state/test.db", "redis://h:6379/0")(VALID))
    s = load_settings(write_tree(tmp_path, text))
    assert dict(s.store_options) == {"require_durable": False, "socket_timeout": 1.5,
                                     "key_prefix": "fg-a"}


@pytest.mark.parametrize("keys, want", [
    ("cluster = true", {"cluster": True}),
    ("cluster = true\nmin_replicas_acked = 1", {"cluster": True, "min_replicas_acked": 1}),
    ("cluster = false", {}),
], ids=["cluster", "cluster-acked", "not-cluster"])
def test_redis_cluster_options(tmp_path, keys, want) -> None:
    text = sub("busy_timeout_ms = 250", keys)(
        sub("sqlite:///state/test.db", "rediss://node-1.internal:7000/0")(VALID))
    assert dict(load_settings(write_tree(tmp_path, text)).store_options) == want


def test_max_body_bytes_at_top_level(tmp_path) -> None:
    text = "max_body_bytes = 4096\n" + VALID.replace("max_body_bytes = 2048\n", "")
    assert load_settings(write_tree(tmp_path, text)).security.max_body_bytes == 4096


def test_admin_listener_is_off_by_default_and_loopback_by_default(tmp_path) -> None:
    path = write_tree(tmp_path)
    assert load_settings(path).admin == AdminSettings(host="127.0.0.1", port=None)
    path.write_text(path.read_text() + "\n[admin]\nport = 9100\n")
    assert load_settings(path).admin == AdminSettings(host="127.0.0.1", port=9100)
    path.write_text(path.read_text() + 'host = "0.0.0.0"\n')
    assert load_settings(path).admin == AdminSettings(host="0.0.0.0", port=9100)


def test_load_keys(tmp_path) -> None:
    keyring, feedback = load_keys(load_settings(write_tree(tmp_path)))
    assert list(keyring) == ["p1"] and keyring["p1"].identity == IDENTITY
    assert feedback.public == PrivateKey(SEED).public


# -- invalid files: (id, edit of VALID, substrings the one-line message must contain) -------
INVALID = [
    ("unknown-top-level", lambda t: "colck_skew_s = 30\n" + t, ["unknown key 'colck_skew_s'"]),
    ("unknown-server-key", sub("port = 9443", 'port = 9443\nhostt = "x"'),
     ["unknown key 'server.hostt'"]),
    ("unknown-identity-key", sub("pins = [", "pinz = 1\npins = ["),
     [f"unknown key 'identities.{IDENTITY}.pinz'"]),
    ("unknown-store-key", sub("busy_timeout_ms", "journal = 1\nbusy_timeout_ms"),
     ["unknown key 'store.journal'"]),
    ("unknown-audit-key", sub('path = "logs', 'rotate = true\npath = "logs'),
     ["unknown key 'audit.rotate'"]),
    ("unknown-policy-key", sub("rules =", "reload = 1\nrules ="), ["unknown key 'policy.reload'"]),
    ("unknown-table", lambda t: t + "\n[metrics]\nport = 9100\n", ["unknown key 'metrics'"]),
    ("unknown-log-key", sub("access = true", "access = true\nfile = 1"),
     ["unknown key 'log.file'"]),
    ("log-format-bad", sub('format = "json"', 'format = "logfmt"'),
     ["log.format must be one of console, json"]),
    ("log-level-bad", sub('level = "warning"', 'level = "WARN"'),
     ["log.level must be one of debug, info, warning, error"]),
    ("log-access-string", sub("access = true", 'access = "yes"'),
     ["log.access must be true or false"]),
    ("log-not-a-table", lambda t: 'log = "json"\n' + sub(
        '[log]\nformat = "json"\nlevel = "warning"\naccess = true\n', "")(t),
     ["log must be a table"]),
    ("unknown-admin-key", lambda t: t + "\n[admin]\nport = 9100\ntls = true\n",
     ["unknown key 'admin.tls'"]),
    ("admin-port-zero", lambda t: t + "\n[admin]\nport = 0\n",
     ["admin.port must be an integer in [1, 65535], got 0"]),
    ("admin-port-string", lambda t: t + '\n[admin]\nport = "9100"\n', ["admin.port must be"]),
    ("admin-port-is-server-port", lambda t: t + "\n[admin]\nport = 9443\n",
     ["admin.port must differ from server.port (9443)"]),
    ("admin-host-empty", lambda t: t + '\n[admin]\nhost = ""\nport = 9100\n',
     ["admin.host must be a non-empty string"]),
    ("server-not-a-table", lambda t: 'server = "x"\n' + t.replace("[server]", "[serverx]"),
     ["server must be a table"]),
    ("missing-tls-cert-file", sub("certs/gateway.crt", "certs/nope.crt"),
     ["server.tls_cert: no such file: ", "certs/nope.crt"]),
    ("tls-cert-not-set", sub('tls_cert = "certs/gateway.crt"\n', ""),
     ["server.tls_cert is required"]),
    ("tls-key-is-a-directory", sub("certs/gateway.key", "certs"),
     ["server.tls_key: not a regular file"]),
    ("missing-client-ca", sub("certs/ca.crt", "/nonexistent/ca.crt"),
     ["server.client_ca: no such file: /nonexistent/ca.crt"]),
    ("missing-feedback-key", sub("keys/fb.pem", "keys/gone.pem"),
     ["feedback_key: no such file: ", "keys/gone.pem"]),
    ("missing-producer-keyring", sub("keys/producers.jwks.json", "keys/x.json"),
     ["producer_keyring: no such file"]),
    ("producer-keyring-not-a-string", sub('"keys/producers.jwks.json"', "7"),
     ["producer_keyring must be a non-empty path string"]),
    ("missing-policy-rules", sub("policy/rules.toml", "policy/none.toml"),
     ["policy.rules: no such file"]),
    ("port-zero", sub("port = 9443", "port = 0"), ["server.port"]),
    ("port-too-big", sub("port = 9443", "port = 65536"), ["server.port"]),
    ("port-string", sub("port = 9443", 'port = "9443"'), ["server.port"]),
    ("port-bool", sub("port = 9443", "port = true"), ["server.port"]),
    ("host-empty", sub('host = "0.0.0.0"', 'host = ""'), ["server.host"]),
    ("header-timeout-zero", sub("header_timeout_s = 4.5", "header_timeout_s = 0"),
     ["server.header_timeout_s must be a number of seconds in (0, 300]"]),
    ("header-timeout-nan", sub("header_timeout_s = 4.5", "header_timeout_s = nan"),
     ["server.header_timeout_s"]),
    ("handshake-timeout-too-long", sub("handshake_timeout_s = 3", "handshake_timeout_s = 301"),
     ["server.handshake_timeout_s"]),
    ("handshake-timeout-string", sub("handshake_timeout_s = 3", 'handshake_timeout_s = "3"'),
     ["server.handshake_timeout_s"]),
    ("idle-timeout-negative", sub("idle_timeout_s = 20", "idle_timeout_s = -1"),
     ["server.idle_timeout_s must be a number of seconds in (0, 3600]"]),
    ("idle-timeout-bool", sub("idle_timeout_s = 20", "idle_timeout_s = true"),
     ["server.idle_timeout_s"]),
    ("identity-share-zero", sub("identity_share = 0.25", "identity_share = 0"),
     ["server.identity_share must be a number in (0, 1]"]),
    ("shutdown-timeout-zero", sub("shutdown_timeout_s = 7.5", "shutdown_timeout_s = 0"),
     ["server.shutdown_timeout_s must be a number of seconds in (0, 20]"]),
    # the supervisor's SIGKILL grace (30 s, gateway/http/workers.py) must stay longer
    ("shutdown-timeout-past-grace", sub("shutdown_timeout_s = 7.5", "shutdown_timeout_s = 25"),
     ["server.shutdown_timeout_s must be a number of seconds in (0, 20]"]),
    ("shutdown-timeout-string", sub("shutdown_timeout_s = 7.5", 'shutdown_timeout_s = "5"'),
     ["server.shutdown_timeout_s"]),
    ("node-name-slash", sub("identity_share = 0.25", 'identity_share = 0.25\nnode_name = "a/b"'),
     ["server.node_name must match"]),
    ("node-name-empty", sub("identity_share = 0.25", 'identity_share = 0.25\nnode_name = ""'),
     ["server.node_name must match"]),
    ("identity-share-above-one", sub("identity_share = 0.25", "identity_share = 1.5"),
     ["server.identity_share"]),
    ("identity-share-string", sub("identity_share = 0.25", 'identity_share = "0.5"'),
     ["server.identity_share"]),
    ("max-connections-zero", sub("max_connections = 500", "max_connections = 0"),
     ["server.max_connections must be an integer in [1, 1000000]"]),
    ("max-connections-float", sub("max_connections = 500", "max_connections = 500.0"),
     ["server.max_connections"]),
    ("store-url-postgres", sub("sqlite:///state/test.db", "postgres://u:secret@h/db"),
     ["store.url"]),
    ("store-url-sqlite-no-path", sub("sqlite:///state/test.db", "sqlite:///"), ["store.url"]),
    ("store-url-two-slashes", sub("sqlite:///state/test.db", "sqlite://state.db"), ["store.url"]),
    ("store-url-redis-no-host", sub("sqlite:///state/test.db", "redis://"), ["store.url"]),
    ("store-option-wrong-backend", sub("sqlite:///state/test.db", "redis://h/0"),
     ["store.busy_timeout_ms applies only to a sqlite store"]),
    ("store-option-bad-value", sub("busy_timeout_ms = 250", "busy_timeout_ms = -1"),
     ["store.busy_timeout_ms"]),
    ("store-cluster-with-sqlite", sub("busy_timeout_ms = 250", "cluster = true"),
     ["store.cluster applies only to a redis store"]),
    ("store-cluster-not-bool", lambda t: sub("busy_timeout_ms = 250", 'cluster = "yes"')(
        sub("sqlite:///state/test.db", "redis://h/0")(t)), ["store.cluster must be true or false"]),
    ("store-replicas-acked-without-cluster", lambda t: sub(
        "busy_timeout_ms = 250", "min_replicas_acked = 1")(
        sub("sqlite:///state/test.db", "redis://h/0")(t)),
     ["store.min_replicas_acked applies only with store.cluster = true"]),
    ("store-replicas-acked-negative", lambda t: sub(
        "busy_timeout_ms = 250", "cluster = true\nmin_replicas_acked = -1")(
        sub("sqlite:///state/test.db", "redis://h/0")(t)),
     ["store.min_replicas_acked must be an integer in [0, 16]"]),
    ("feedback-kid-bad", sub('"vv-fb-2026"', '"vv fb/2026"'), ["feedback_kid"]),
    ("feedback-kid-too-long", sub('"vv-fb-2026"', '"' + "k" * 129 + '"'), ["feedback_kid"]),
    ("feedback-kid-missing", sub('feedback_kid = "vv-fb-2026"\n', ""),
     ["feedback_kid is required"]),
    ("unsafe-ttl", lambda t: sub("nonce_ttl_s = 100", "nonce_ttl_s = 60")(
        sub("clock_skew_s = 20", "clock_skew_s = 30")(t)), ["nonce_ttl_s", "2 * clock_skew_s + 1"]),
    ("clock-skew-string", sub("clock_skew_s = 20", 'clock_skew_s = "30"'), ["clock_skew_s"]),
    ("bad-pin", sub(PIN, "AB" * 32), [f"identities.{IDENTITY}.pins"]),
    ("bad-operator-tenant", sub('op-001 = "', 'op-001 = "x'), ["operator_tenants.op-001"]),
    ("server-max-body-zero", sub("max_body_bytes = 2048", "max_body_bytes = 0"),
     ["server.max_body_bytes must be"]),
    ("max-body-twice", lambda t: "max_body_bytes = 10\n" + t, ["max_body_bytes is set both"]),
    ("invalid-toml", sub("port = 9443", "port = "), ["invalid TOML: "]),
    ("duplicate-table", lambda t: t + "\n[server]\n", ["invalid TOML: "]),
    ("audit-path-is-a-directory", sub('"logs/audit.jsonl"', '"certs"'), ["audit.path"]),
    ("audit-parent-is-a-file", sub('"logs/audit.jsonl"', '"certs/ca.crt/audit.jsonl"'),
     ["audit.path: cannot create"]),
]


@pytest.mark.parametrize("edit, needles", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_config(tmp_path, edit, needles) -> None:
    msg = expect_error(write_tree(tmp_path, edit(VALID)), *needles)
    assert "secret" not in msg  # a store URL may carry a password: never echoed


def test_unreadable_key_file_fails_closed(tmp_path, monkeypatch) -> None:
    cfg = write_tree(tmp_path)
    pem = tmp_path / "keys/fb.pem"
    pem.chmod(0)
    if os.access(pem, os.R_OK):  # root reads a mode-000 file: make open() refuse as it would
        real_open = Path.open

        def refusing_open(self: Path, *args, **kwargs):
            if self == pem:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refusing_open)
    try:
        expect_error(cfg, f"feedback_key: cannot read {pem} (Permission denied)")
    finally:
        pem.chmod(0o600)


def test_unwritable_audit_directory(tmp_path, monkeypatch) -> None:
    cfg = write_tree(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o500)
    if os.access(logs, os.W_OK):  # root writes anywhere: make access() answer as for a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
            Path(p) not in (logs, logs / "audit.jsonl") and real_access(p, mode, **kw)))
    try:
        expect_error(cfg, f"audit.path: not writable: {logs / 'audit.jsonl'}")
    finally:
        logs.chmod(0o700)


def test_missing_config_file(tmp_path) -> None:
    cfg = tmp_path / "absent.toml"
    expect_error(cfg, "cannot read")


def test_config_not_utf8(tmp_path) -> None:
    cfg = write_tree(tmp_path)
    cfg.write_bytes(b'feedback_kid = "\xff"\n')
    expect_error(cfg, "invalid TOML: not UTF-8")


# -- invalid keys (load_keys): (id, what to write, substrings) ------------------------------
def _jwk(kid: str, identity: str = IDENTITY) -> dict:
    return producer_key(kid, identity).to_jwk()


BAD_KEYS = [
    ("duplicate-kid", "keys/producers.jwks.json", {"keys": [_jwk("x"), _jwk("x")]},
     ["producer_keyring: ", "duplicate kid 'x'"]),
    ("malformed-kid", "keys/producers.jwks.json", {"keys": [_jwk("bad kid")]},
     ["producer_keyring: ", "malformed kid 'bad kid'"]),
    ("keyring-not-json", "keys/producers.jwks.json", b"{not json",
     ["producer_keyring: ", "not JSON"]),
    ("identity-not-configured", "keys/producers.jwks.json",
     {"keys": [_jwk("p1"), _jwk("ghost-key", "ghost")]},
     ["producer_keyring: key 'ghost-key' is for identity 'ghost'", "not configured"]),
    ("key-without-identity", "keys/producers.jwks.json",
     {"keys": [{k: v for k, v in _jwk("lonely").items() if k != "identity"}]},
     ["producer_keyring: key 'lonely' has no identity"]),
    ("feedback-key-not-pem", "keys/fb.pem", b"this is not a PEM\n",
     ["feedback_key: ", "fb.pem", "not an unencrypted PKCS#8 PEM"]),
    ("feedback-key-is-a-public-jwk", "keys/fb.pem", json.dumps(_jwk("fb")).encode(),
     ["feedback_key: "]),
]


@pytest.mark.parametrize("rel, content, needles", [c[1:] for c in BAD_KEYS],
                         ids=[c[0] for c in BAD_KEYS])
def test_invalid_keys(tmp_path, rel, content, needles) -> None:
    cfg = write_tree(tmp_path)
    load_settings(cfg)  # the file itself is fine: the keys are checked by load_keys
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (tmp_path / rel).write_bytes(data)
    expect_error(cfg, *needles, keys=True)


# -- the shipped example --------------------------------------------------------------------
def _example_files(doc: dict) -> list[str]:
    server, policy = doc.get("server", {}), doc.get("policy", {})
    paths = [doc["producer_keyring"], doc["feedback_key"], server["tls_cert"], server["tls_key"],
             server["client_ca"]]
    return paths + ([policy["rules"]] if "rules" in policy else [])


def test_shared_example_loads(tmp_path) -> None:
    """examples/gateway.toml and this loader agree: it loads once its files exist."""
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing (PROTOCOL.md §8 names it)"
    text = re.sub(r'"<[^"]*>"', f'"{PIN}"', EXAMPLE.read_text(encoding="utf-8"))
    conf = tmp_path / "examples"  # "../local_docs/…" then stays inside tmp_path
    conf.mkdir()
    cfg = conf / "gateway.toml"
    cfg.write_text(text, encoding="utf-8")
    doc = tomllib.loads(text)
    for rel in _example_files(doc):
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        (conf / rel).write_bytes(b"placeholder\n")
    (identity,) = doc["identities"]
    save_jwks(conf / doc["producer_keyring"], Keyring([producer_key("p1", identity)]))
    (conf / doc["feedback_key"]).write_bytes(PrivateKey(SEED).to_pem())
    settings = load_settings(cfg)
    keyring, _ = load_keys(settings)
    assert settings.feedback_kid == doc["feedback_kid"] and list(keyring) == ["p1"]
    assert settings.security.identities[identity].pins == {PIN}
    assert settings.server.port == doc["server"]["port"]
    assert settings.audit_path.is_relative_to(tmp_path) and settings.audit_path.parent.is_dir()
    if settings.store_url.startswith("sqlite:"):
        assert settings.store_url.startswith(f"sqlite:///{conf}/")


def test_example_copy_matches_shared_when_present() -> None:
    """The copy under tests/data is the shared example, byte for byte, where shared/ exists."""
    shared = ROOT.parent / "shared" / "examples" / "gateway.toml"
    if not shared.is_file():
        pytest.skip("no ../shared checkout beside this repository")
    assert shared.read_bytes() == EXAMPLE.read_bytes()


def test_one_pin_for_two_identities_is_refused() -> None:
    from gateway.config.config import SecurityConfig
    pin = "ab" * 32
    raw = {"identities": {"a": {"pins": [pin], "tenants": []},
                          "b": {"pins": [pin], "tenants": []}}}
    with pytest.raises(ConfigError, match=r"identities\.b\.pins"):
        SecurityConfig.from_mapping(raw)


def test_one_public_key_for_two_identities_is_refused(tmp_path) -> None:
    text = VALID + '\n[identities.other-producer]\npins = ["' + "cd" * 32 + '"]\ntenants = []\n'
    cfg = write_tree(tmp_path, text)
    public = PrivateKey(os.urandom(32)).public
    save_jwks(tmp_path / "keys/producers.jwks.json", Keyring([
        Key("k-a", public, identity=IDENTITY), Key("k-b", public, identity="other-producer")]))
    expect_error(cfg, "producer_keyring", "reuses the public key", keys=True)


# -- [audit] checkpoint_* (issue 10) -------------------------------------------------------
AUDIT_PATH = 'path = "logs/audit.jsonl"'


def test_audit_checkpoints_are_off_without_a_key_and_load_with_one(tmp_path) -> None:
    assert load_settings(write_tree(tmp_path)).audit_checkpoints is None
    cfg = write_tree(tmp_path, sub(AUDIT_PATH, AUDIT_PATH + '\ncheckpoint_key = "keys/audit.pem"'
                                   '\ncheckpoint_kid = "aud-1"\ncheckpoint_every_s = 5')(VALID))
    (tmp_path / "keys/audit.pem").write_bytes(PrivateKey(bytes([3]) * 32).to_pem())
    settings = load_settings(cfg)
    cp = settings.audit_checkpoints
    assert (cp.key, cp.kid, cp.every_events, cp.every_s) == (
        tmp_path / "keys/audit.pem", "aud-1", 1000, 5.0)
    load_keys(settings)


@pytest.mark.parametrize(("extra", "needle"), [
    ('checkpoint_kid = "a"', "audit.checkpoint_kid is set without audit.checkpoint_key"),
    ('checkpoint_key = "keys/audit.pem"', "audit.checkpoint_kid is required"),
    ('checkpoint_key = "keys/nope.pem"\ncheckpoint_kid = "a"', "audit.checkpoint_key"),
    ('checkpoint_key = "keys/audit.pem"\ncheckpoint_kid = "a b"', "audit.checkpoint_kid must"),
    ("checkpoint_every_events = 0", "audit.checkpoint_every_events must be an integer"),
    ("checkpoint_every_events = true", "audit.checkpoint_every_events must be an integer"),
    ("checkpoint_every_s = 0", "audit.checkpoint_every_s must be a number"),
    ("checkpoint_every_s = 90000", "audit.checkpoint_every_s must be a number"),
])
def test_invalid_audit_checkpoint_keys(tmp_path, extra, needle) -> None:
    cfg = write_tree(tmp_path, sub(AUDIT_PATH, AUDIT_PATH + "\n" + extra)(VALID))
    (tmp_path / "keys/audit.pem").write_bytes(PrivateKey(bytes([3]) * 32).to_pem())
    expect_error(cfg, needle)


@pytest.mark.parametrize(("content", "needle"), [
    (b"not a key\n", "audit.checkpoint_key: "),
    (PrivateKey(SEED).to_pem(), "is the feedback key"),
])
def test_a_bad_or_reused_audit_key_fails_load_keys(tmp_path, content, needle) -> None:
    cfg = write_tree(tmp_path, sub(AUDIT_PATH, AUDIT_PATH + '\ncheckpoint_key = "keys/a.pem"'
                                   '\ncheckpoint_kid = "a"')(VALID))
    (tmp_path / "keys/a.pem").write_bytes(content)
    expect_error(cfg, needle, keys=True)
