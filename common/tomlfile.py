"""Shared plumbing of fedgate's TOML files (gateway and emitter configs).

One way to read a file, resolve a path member against the file's directory, and check
that a named file can be opened now — every defect a ``ConfigError`` naming the key,
prefixed once with the config file's path. Every string value (at any depth, in arrays
too) may name environment variables as ``${NAME}`` (PROTOCOL.md §8 v1.1); ``$${`` is a
literal ``${``. An unset variable or a malformed reference is a ``ConfigError`` naming
the key and the variable, never the value (it is often a secret).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid or unsafe configuration; the message names the key."""


def load_file(path: str | Path, build: Callable[[Path, Mapping[str, Any]], T]) -> T:
    """Read ``path`` and ``build(cfg, raw)``; errors carry the file's absolute path."""
    cfg = Path(os.path.abspath(path))
    raw = read_toml(cfg)
    try:
        return build(cfg, raw)
    except ConfigError as exc:
        raise ConfigError(f"{cfg}: {exc}") from None


def read_toml(cfg: Path) -> dict[str, Any]:
    try:
        data = cfg.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{cfg}: cannot read ({exc.strerror})") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{cfg}: invalid TOML: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cfg}: invalid TOML: {exc}") from None
    try:
        return expand_env(raw, os.environ)
    except ConfigError as exc:
        raise ConfigError(f"{cfg}: {exc}") from None


# "$${" (a literal "${"), "${NAME}", or any other "${" (an error)
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")


def expand_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``raw`` with ``${NAME}`` replaced in every string value, in one pass (a variable's
    value is not expanded again). Keys are never expanded."""

    def string(value: str, key: str) -> str:
        def one(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name = m.group(1)
            if name is None:
                raise ConfigError(f"{key}: malformed environment reference: use ${{NAME}} "
                                  "(NAME: letters, digits, _) or $${ for a literal ${")
            if name not in environ:
                raise ConfigError(f"{key}: environment variable {name} is not set")
            return environ[name]

        return _ENV_REF.sub(one, value) if "$" in value else value

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, str):
            return string(value, key)
        if isinstance(value, dict):
            return {k: walk(v, f"{key}.{k}" if key else k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    return walk(raw, "")


def path_value(table: Mapping[str, Any], key: str, base: Path, prefix: str = "",
               default: str | None = None) -> Path:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(f"{prefix}{key} is required")
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{prefix}{key} must be a non-empty path string, got {value!r}")
    return (base / value).resolve()  # as the OS will open it: symlinks and ".." followed


def readable_file(table: Mapping[str, Any], key: str, base: Path, prefix: str = "") -> Path:
    """A regular file we can open for reading now: fail closed at start-up, not later."""
    path = path_value(table, key, base, prefix)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"{prefix}{key}: not a regular file: {path}")
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(f"{prefix}{key}: no such file: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{prefix}{key}: cannot read {path} ({exc.strerror})") from None
    return path
