"""Ed25519 keys by ``kid`` (PROTOCOL.md §1): JWKS files, PEM private keys, sign/verify.

Note: ``keyring`` is also a popular PyPI package; this project runs in its own
virtualenv and ``tests/unit/test_keyring.py`` asserts this module is the one imported.
"""

from .ed25519 import PrivateKey, self_test, sign, verify
from .keys import Key, Keyring, KeyringError, KeyStatus, load_jwks, parse_jwks
from .select import KeySelectionError, candidate_keys

__all__ = [
    "Key", "KeyStatus", "Keyring", "KeyringError", "KeySelectionError", "PrivateKey",
    "candidate_keys", "load_jwks", "parse_jwks", "self_test", "sign", "verify",
]
