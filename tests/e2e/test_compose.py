"""docker-compose.yml cannot run here (no Docker engine): check it against the project.

Every command a service runs must parse with the real CLI, every port and path must be
the ones the project produces, and the Dockerfile must copy only what exists.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

from fedgate.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES = COMPOSE["services"]


def test_services_are_the_expected_ones():
    assert set(SERVICES) == {"redis", "init", "gateway", "emitter"}


def test_redis_is_durable():
    command = SERVICES["redis"]["command"]
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags == {"--appendonly": "yes", "--appendfsync": "always",  # RedisStore requires
                     "--maxmemory-policy": "noeviction"}


@pytest.mark.parametrize("service", ["init", "gateway"])
def test_fedgate_commands_parse_with_the_real_cli(service):
    args = build_parser().parse_args(SERVICES[service]["command"])
    assert args.run.__name__.startswith("cmd_")  # not the missing-action default


def test_healthcheck_probe_parses_and_targets_readyz():
    test = SERVICES["gateway"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "fedgate"]
    args = build_parser().parse_args(test[2:])
    assert args.run.__name__ == "cmd_probe"


def test_init_writes_what_the_others_read():
    init = build_parser().parse_args(SERVICES["init"]["command"])
    state = str(init.dir)
    gateway = build_parser().parse_args(SERVICES["gateway"]["command"])
    assert str(gateway.config) == f"{state}/gateway.toml"  # bootstrap writes DIR/gateway.toml
    emitter_args = SERVICES["emitter"]["command"]
    assert f"{state}/emitter.toml" in emitter_args
    assert f"{state}/audit/gateway-audit.jsonl" in emitter_args
    assert init.store_url == "redis://redis:6379/0"
    assert init.host == "gateway" and init.bind == "0.0.0.0"
    published = SERVICES["gateway"]["ports"][0].split(":")
    assert published == [str(init.port), str(init.port)]
    for name in ("init", "gateway", "emitter"):
        assert any(v.startswith("state:") and v.endswith(state)
                   for v in SERVICES[name]["volumes"])


def test_emitter_runs_the_smoke_script_with_valid_arguments():
    emitter = SERVICES["emitter"]
    assert emitter["entrypoint"] == ["python", "tests/e2e/smoke.py"]
    spec = importlib.util.spec_from_file_location("smoke", ROOT / "tests" / "e2e" / "smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    args = smoke.build_parser().parse_args(emitter["command"])
    assert str(args.out) == "/app/local_docs/audit"
    assert any(v == "./local_docs/audit:/app/local_docs/audit" for v in emitter["volumes"])


def test_dependencies_wait_for_health():
    assert SERVICES["gateway"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "init": {"condition": "service_completed_successfully"}}
    assert SERVICES["emitter"]["depends_on"] == {"gateway": {"condition": "service_healthy"}}


def test_dockerfile_copies_only_existing_paths_and_installs_fedgate():
    lines = (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    copies = [shlex.split(line)[1:-1] for line in lines if line.startswith("COPY ")]
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert any("pip install" in line for line in lines)
    assert 'ENTRYPOINT ["fedgate"]' in lines
    assert "EXPOSE 8443" in lines
