"""The one stderr line and exit code of an expected failure (a bad config, a key, the
store): the `fedgate` command and the gateway's worker processes report the same way."""

from __future__ import annotations

from common.tomlfile import ConfigError
from keyring.ed25519 import SelfTestError
from keyring.keys import KeyringError

from .store import StoreError


def one_line(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, the one stderr line) for an expected failure; None for a bug."""
    if isinstance(exc, ConfigError | KeyringError | SelfTestError | ValueError):
        return 2, f"fedgate: error: {exc}"
    if isinstance(exc, StoreError):
        return 1, f"fedgate: error: store unavailable: {exc.detail}"
    if isinstance(exc, OSError):
        return 1, f"fedgate: error: {exc}"
    return None
