"""One signer interface for a key in a file and a key in a PKCS#11 token.

A signer has ``sign(message) -> bytes`` (64-byte Ed25519 signature), ``public`` /
``public_key`` (32 bytes), ``kid``, ``blocking`` (True: the call waits on a device, so
async code uses :func:`sign_async`) and ``close()``. :func:`open_signer` builds one from
a config value: a path to a PKCS#8 PEM file, or a ``pkcs11:`` URI with ``[pkcs11]``.
:func:`check_signer` is the signer's own known-answer test (start-up and ``fedgate
selftest``): it signs a fixed message twice through the signer and checks the two answers
are equal (Ed25519 is deterministic) and verify under the signer's public key with
libsodium, and that a changed message does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.tomlfile import ConfigError, path_value, readable_file

from .ed25519 import PrivateKey, SelfTestError, verify
from .pkcs11 import Pkcs11Signer
from .pkcs11_uri import Pkcs11Config, Pkcs11Error, Pkcs11Uri, is_uri, parse_uri

KeySource = Path | Pkcs11Uri
_PROBE = b"fedgate signer self-test: Ed25519 over the token or the file key"


class FileSigner:
    """A PKCS#8 PEM key held in memory (the file-key deployment)."""

    blocking = False

    def __init__(self, key: PrivateKey, kid: str | None = None) -> None:
        self._key, self.kid, self.public = key, kid, key.public

    @classmethod
    def load(cls, path: str | Path, kid: str | None = None) -> FileSigner:
        return cls(PrivateKey.load(path), kid)  # ValueError names the file

    @property
    def public_key(self) -> bytes:
        return self.public

    def __repr__(self) -> str:
        return f"FileSigner(kid={self.kid!r}, public={self.public.hex()[:16]}…)"

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    async def sign_async(self, message: bytes) -> bytes:
        return self._key.sign(message)  # ~20 µs in libsodium: no thread hop

    def close(self) -> None:
        return None


def open_signer(source: KeySource, kid: str | None = None, *,
                pkcs11: Pkcs11Config | None = None) -> FileSigner | Pkcs11Signer:
    """The signer for a configured key; ValueError (one line) when it cannot be used."""
    if isinstance(source, Pkcs11Uri):
        if pkcs11 is None:
            raise ValueError(f"{source}: a pkcs11: key needs the [pkcs11] table "
                             "(module, pin)")
        return Pkcs11Signer(pkcs11, source, kid)
    return FileSigner.load(source, kid)


async def sign_async(signer, message: bytes) -> bytes:
    """Sign without making the event loop wait on a device (a plain ``PrivateKey`` too)."""
    method = getattr(signer, "sign_async", None)
    return await method(message) if method is not None else signer.sign(message)


def check_signer(signer, what: str = "signer") -> None:
    """The signer's known-answer test; SelfTestError (one line) on any wrong answer."""
    try:
        first, second = signer.sign(_PROBE), signer.sign(_PROBE)
    except ValueError as exc:
        raise SelfTestError(f"{what} self-test: {exc}") from None
    public = bytes(signer.public)
    if first != second:
        raise SelfTestError(f"{what} self-test: two signatures of one message differ "
                            "(Ed25519 is deterministic)")
    if not verify(public, first, _PROBE):
        raise SelfTestError(f"{what} self-test: the signature does not verify under the "
                            "key's public key (wrong key pair, or a faulty token)")
    if verify(public, first, _PROBE + b"x"):
        raise SelfTestError(f"{what} self-test: a signature verified a changed message")


# -- config files (gateway and emitter alike: docs/CONFIG.md, docs/KEYS.md) -----------------

def key_source(table: Mapping[str, Any], name: str, base: Path,
               prefix: str = "") -> KeySource:
    """A key member: ``pkcs11:…`` (RFC 7512) or a readable PEM file; ConfigError."""
    value = table.get(name)
    if is_uri(value):
        try:
            return parse_uri(value)
        except Pkcs11Error as exc:
            raise ConfigError(f"{prefix}{name}: {exc}") from None
    return readable_file(table, name, base, prefix)


def pkcs11_config(raw: Mapping[str, Any], base: Path,
                  used_by: tuple[str, ...]) -> Pkcs11Config | None:
    """``[pkcs11]`` module + pin; required when one of ``used_by`` is a pkcs11: URI."""
    table = raw.get("pkcs11")
    needed = [name for name in used_by if is_uri(raw.get(name))]
    if table is None:
        if needed:
            raise ConfigError(f"{needed[0]} is a pkcs11: URI: the [pkcs11] table (module, "
                              "pin) is required")
        return None
    if not isinstance(table, Mapping):
        raise ConfigError("pkcs11 must be a table ([pkcs11])")
    unknown = sorted(set(table) - {"module", "pin"})
    if unknown:
        raise ConfigError(f"unknown key {'pkcs11.' + unknown[0]!r}")
    pin = table.get("pin")
    if not isinstance(pin, str) or not pin:
        raise ConfigError("pkcs11.pin is required (a string; use ${ENV_NAME} to keep it "
                          "out of the file)")
    module = path_value(table, "module", base, "pkcs11.")
    return Pkcs11Config(module=readable_file({"module": str(module)}, "module", base,
                                             "pkcs11."), pin=pin)
