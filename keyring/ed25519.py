"""Ed25519 (RFC 8032, pure) sign/verify and the start-up known-answer test.

Verification uses PyNaCl (libsodium: 89 µs per verify here against 158 µs for
``cryptography``); PEM/PKCS#8 plumbing uses ``cryptography``. A malformed signature or
key is simply a failed verification (itsdangerous' rule): ``verify`` never raises.
"""

from __future__ import annotations

from pathlib import Path

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519 as crypto_ed25519

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class PrivateKey:
    """An Ed25519 signing key held in memory (HSM-ready: anything with .sign/.public)."""

    __slots__ = ("_secret", "public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self.public, self._secret = nacl.bindings.crypto_sign_seed_keypair(seed)

    def __repr__(self) -> str:  # never print the secret
        return f"PrivateKey(public={self.public.hex()[:16]}…)"

    def sign(self, message: bytes) -> bytes:
        return nacl.bindings.crypto_sign(message, self._secret)[:SIGNATURE_BYTES]

    @classmethod
    def from_pem(cls, data: bytes) -> PrivateKey:
        """A PKCS#8 PEM Ed25519 private key (unencrypted); ValueError otherwise."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not an unencrypted PKCS#8 PEM private key ({exc})") from None
        if not isinstance(key, crypto_ed25519.Ed25519PrivateKey):
            raise ValueError("the PEM key is not an Ed25519 key")
        return cls(key.private_bytes_raw())

    @classmethod
    def load(cls, path: str | Path) -> PrivateKey:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            return cls.from_pem(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_pem(self) -> bytes:
        seed = nacl.bindings.crypto_sign_ed25519_sk_to_seed(self._secret)
        key = crypto_ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def sign(key: PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True only for a valid signature; malformed input is just False."""
    if len(public) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + message, public)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError,
            TypeError):
        return False
    return True


# RFC 8032 §7.1, TEST 1 (empty message).
_KAT_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
_KAT_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
_KAT_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
    "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


class SelfTestError(RuntimeError):
    """The loaded crypto libraries failed the known-answer test: refuse to start."""


def self_test() -> None:
    """Power-on self-test: RFC 8032 vector 1 signs and verifies; a tampered one fails."""
    key = PrivateKey(_KAT_SEED)
    if key.public != _KAT_PUBLIC:
        raise SelfTestError("Ed25519 self-test: derived public key differs from RFC 8032")
    if key.sign(b"") != _KAT_SIGNATURE:
        raise SelfTestError("Ed25519 self-test: signature differs from RFC 8032 test 1")
    if not verify(_KAT_PUBLIC, _KAT_SIGNATURE, b""):
        raise SelfTestError("Ed25519 self-test: the RFC 8032 signature does not verify")
    tampered = bytes([_KAT_SIGNATURE[0] ^ 1]) + _KAT_SIGNATURE[1:]
    if verify(_KAT_PUBLIC, tampered, b"") or verify(_KAT_PUBLIC, _KAT_SIGNATURE, b"x"):
        raise SelfTestError("Ed25519 self-test: a tampered signature verified")
