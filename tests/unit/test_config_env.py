"""`${NAME}` environment references in config values (PROTOCOL.md §8 v1.1): real files,
loaded by the real loader; one case through the real `fedgate serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_settings import PIN, VALID, sub, write_tree

from common.tomlfile import ConfigError
from gateway.config.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("FEDGATE_T_PW", SECRET)
    monkeypatch.setenv("FEDGATE_T_PIN", PIN)
    monkeypatch.setenv("FEDGATE_T_EMPTY", "")
    monkeypatch.delenv("FEDGATE_T_UNSET", raising=False)


REDIS = sub('url = "sqlite:///state/test.db"\nbusy_timeout_ms = 250',
            'url = "redis://:${FEDGATE_T_PW}@127.0.0.1:6379/0"')


def test_a_reference_in_the_store_url_is_replaced(tmp_path):
    s = load_settings(write_tree(tmp_path, REDIS(VALID)))
    assert s.store_url == f"redis://:{SECRET}@127.0.0.1:6379/0"


def test_references_in_arrays_several_per_value_and_the_escape(tmp_path):
    text = sub(f'pins = ["{PIN}"]', 'pins = ["${FEDGATE_T_PIN}"]')(VALID)
    text = sub('host = "0.0.0.0"', 'host = "$${FEDGATE_T_PW}${FEDGATE_T_EMPTY}$x$$"')(text)
    s = load_settings(write_tree(tmp_path, text))
    assert next(iter(s.security.identities.values())).pins == frozenset({PIN})
    assert s.server.host == "${FEDGATE_T_PW}$x$$"  # $${ is a literal ${; lone $ untouched


@pytest.mark.parametrize(("value", "message"), [
    ("redis://:${FEDGATE_T_UNSET}@h:6379/0", "store.url: environment variable "
     "FEDGATE_T_UNSET is not set"),
    ("redis://:${FEDGATE_T_PW@h:6379/0", "store.url: malformed environment reference: use "
     "${NAME} (NAME: letters, digits, _) or $${ for a literal ${"),
    ("redis://:${1X}@h/0", "store.url: malformed environment reference: use "
     "${NAME} (NAME: letters, digits, _) or $${ for a literal ${"),
])
def test_an_unset_or_malformed_reference_is_one_line_naming_key_and_variable(
        tmp_path, value, message):
    cfg = write_tree(tmp_path, sub('url = "sqlite:///state/test.db"\nbusy_timeout_ms = 250',
                                   f"url = {value!r}".replace("'", '"'))(VALID))
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    assert str(exc.value) == f"{cfg}: {message}"


def test_the_resolved_secret_never_appears_in_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGATE_T_URL", f"postgres://u:{SECRET}@db/x")
    cfg = write_tree(tmp_path, sub('url = "sqlite:///state/test.db"\nbusy_timeout_ms = 250',
                                   'url = "${FEDGATE_T_URL}"')(VALID))
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    assert "store.url must be" in str(exc.value) and SECRET not in str(exc.value)


def test_fedgate_serve_with_an_unset_variable_exits_2_with_one_line(tmp_path):
    cfg = write_tree(tmp_path, sub('url = "sqlite:///state/test.db"\nbusy_timeout_ms = 250',
                                   'url = "redis://:${FEDGATE_T_UNSET}@h/0"')(VALID))
    env = {k: v for k, v in os.environ.items() if k != "FEDGATE_T_UNSET"}
    result = subprocess.run([sys.executable, "-m", "fedgate.cli", "serve", "--config",
                             str(cfg)], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f"fedgate: error: {cfg}: store.url: environment variable "
                             "FEDGATE_T_UNSET is not set\n")
