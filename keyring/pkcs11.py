"""Ed25519 keys inside a PKCS#11 token, named by an RFC 7512 URI (docs/KEYS.md).

The private key never leaves the token: :class:`Pkcs11Signer` asks the token to sign
(``CKM_EDDSA``); only the public key object (``CKA_EC_POINT``, a DER OCTET STRING) is
read. :func:`generate_key` and :func:`import_seed` put a key pair into the token (``fedgate
keys new``, the tests). The URI and ``[pkcs11]`` are parsed in keyring/pkcs11_uri.py;
sessions and the process's one login per token are keyring/pkcs11_session.py's.

A PKCS#11 session is not thread-safe: a signer holds one session, behind a lock, and its
``sign_async`` runs in the signer's own one-thread executor (the event loop never waits
on the token).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .pkcs11_session import describe, find_objects, open_session, pkcs11_module
from .pkcs11_uri import Pkcs11Config, Pkcs11Error, Pkcs11Uri, parse_uri

# Pkcs11Config, Pkcs11Error and parse_uri: re-exported for the tests that import them here
__all__ = ["Pkcs11Config", "Pkcs11Error", "Pkcs11Signer", "generate_key", "import_seed",
           "parse_uri", "public_bytes"]

ED25519_PARAMS = bytes.fromhex("06032b6570")  # DER of OID 1.3.101.112 (id-Ed25519)
# what a key may carry in CKA_EC_PARAMS: the OID, or PKCS#11 3.0's PrintableString curve
# name (SoftHSM2 gives its generated private keys "edwards25519")
_ED25519_NAMES = (ED25519_PARAMS, b"\x13\x0cedwards25519")


def public_bytes(ec_point: bytes) -> bytes:
    """CKA_EC_POINT of an Ed25519 key: a DER OCTET STRING (04 20 ‖ 32 bytes), or raw."""
    if len(ec_point) == 34 and ec_point[:2] == b"\x04\x20":
        return ec_point[2:]
    if len(ec_point) == 32:
        return ec_point
    raise Pkcs11Error(f"CKA_EC_POINT is not an Ed25519 public key ({len(ec_point)} bytes)")


class Pkcs11Signer:
    """Signs with the token's private key; ``public`` from its public key object."""

    blocking = True  # a round trip to the token: call ``sign_async`` from the event loop

    def __init__(self, config: Pkcs11Config, uri: Pkcs11Uri, kid: str | None = None) -> None:
        pkcs11 = pkcs11_module()
        self.uri, self.kid = uri, kid
        self._mechanism = pkcs11.Mechanism.EDDSA
        self._errors = pkcs11.exceptions.PKCS11Error
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._session = open_session(config, uri)
        try:
            self._key, self.public = self._pair(pkcs11)
        except BaseException:
            self._session.close()
            raise

    def _pair(self, pkcs11) -> tuple[Any, bytes]:
        Obj, A = pkcs11.ObjectClass, pkcs11.Attribute
        private = find_objects(self._session, self.uri, Obj.PRIVATE_KEY)
        public = find_objects(self._session, self.uri, Obj.PUBLIC_KEY)
        if len(private) != 1:
            raise Pkcs11Error(f"{self.uri}: {len(private) or 'no'} private key objects match "
                              "(need exactly one)")
        if len(public) != 1:
            raise Pkcs11Error(f"{self.uri}: {len(public) or 'no'} public key objects match "
                              "(need exactly one, same label/id as the private key)")
        key = private[0]
        if key[A.KEY_TYPE] != pkcs11.KeyType.EC_EDWARDS or key[A.EC_PARAMS] not in _ED25519_NAMES:
            raise Pkcs11Error(f"{self.uri}: the key is not an Ed25519 key")
        return key, public_bytes(public[0][A.EC_POINT])

    @property
    def public_key(self) -> bytes:
        return self.public

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self.uri}, kid={self.kid!r})"

    def sign(self, message: bytes) -> bytes:
        with self._lock:
            if self._session is None:
                raise Pkcs11Error(f"{self.uri}: the signer is closed")
            try:
                return bytes(self._key.sign(message, mechanism=self._mechanism))
            except self._errors as exc:
                raise Pkcs11Error(f"{self.uri}: signing failed: {describe(exc)}") from None

    async def sign_async(self, message: bytes) -> bytes:
        """``sign`` in this signer's one thread (the session is used by one thread)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.sign,
                                                                message)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            if self._session is not None:
                with contextlib.suppress(self._errors):
                    self._session.close()
                self._session = None


def _templates(pkcs11, uri: Pkcs11Uri) -> tuple[dict, dict]:
    A = pkcs11.Attribute
    common = {A.TOKEN: True, A.LABEL: uri.object or "",
              A.ID: uri.id if uri.id is not None else (uri.object or "").encode()}
    public = {**common, A.VERIFY: True, A.EC_PARAMS: ED25519_PARAMS}
    private = {**common, A.SIGN: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
               A.PRIVATE: True}
    return public, private


def _refuse_existing(session, uri: Pkcs11Uri) -> None:
    pkcs11 = pkcs11_module()
    for cls in (pkcs11.ObjectClass.PRIVATE_KEY, pkcs11.ObjectClass.PUBLIC_KEY):
        if find_objects(session, uri, cls):
            raise Pkcs11Error(f"{uri}: a key with this label/id exists; refusing to add another")


def generate_key(config: Pkcs11Config, uri: Pkcs11Uri) -> bytes:
    """A new Ed25519 pair generated inside the token (never extractable); its public key."""
    pkcs11 = pkcs11_module()
    with open_session(config, uri, rw=True) as session:
        _refuse_existing(session, uri)
        public, private = _templates(pkcs11, uri)
        try:
            pub, _ = session.generate_keypair(
                pkcs11.KeyType.EC_EDWARDS, public_template=public, private_template=private,
                mechanism=pkcs11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN)
        except pkcs11.exceptions.PKCS11Error as exc:
            raise Pkcs11Error(f"{uri}: key generation failed: {describe(exc)}") from None
        return public_bytes(pub[pkcs11.Attribute.EC_POINT])


def import_seed(config: Pkcs11Config, uri: Pkcs11Uri, seed: bytes) -> bytes:
    """Put an existing Ed25519 seed into the token as a non-extractable private key plus
    its public key object (migrating a file key; the tests' vector seed); its public key."""
    import nacl.bindings

    pkcs11 = pkcs11_module()
    A, Obj = pkcs11.Attribute, pkcs11.ObjectClass
    public_key = nacl.bindings.crypto_sign_seed_keypair(seed)[0]
    with open_session(config, uri, rw=True) as session:
        _refuse_existing(session, uri)
        public, private = _templates(pkcs11, uri)
        kind = {A.KEY_TYPE: pkcs11.KeyType.EC_EDWARDS, A.EC_PARAMS: ED25519_PARAMS}
        try:
            session.create_object({**private, **kind, A.CLASS: Obj.PRIVATE_KEY, A.VALUE: seed})
            session.create_object({**public, **kind, A.CLASS: Obj.PUBLIC_KEY,
                                   A.EC_POINT: b"\x04\x20" + public_key})
        except pkcs11.exceptions.PKCS11Error as exc:
            raise Pkcs11Error(f"{uri}: import failed: {describe(exc)}") from None
    return public_key
