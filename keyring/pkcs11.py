"""Ed25519 keys inside a PKCS#11 token, named by an RFC 7512 URI (docs/KEYS.md).

The private key never leaves the token: :class:`Pkcs11Signer` asks the token to sign
(``CKM_EDDSA``); only the public key object (``CKA_EC_POINT``, a DER OCTET STRING) is
read. ``python-pkcs11`` is imported lazily: a file-key deployment never loads it.

A PKCS#11 session is not thread-safe: a signer holds one session, behind a lock, and its
``sign_async`` runs in the signer's own one-thread executor (the event loop never waits
on the token). SoftHSM2 reads ``SOFTHSM2_CONF`` once, when the module is first loaded
in a process: set it in the environment before starting.

Every failure is a :class:`Pkcs11Error` (a ``ValueError``): one line naming the URI and
the reason, never the PIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

ED25519_PARAMS = bytes.fromhex("06032b6570")  # DER of OID 1.3.101.112 (id-Ed25519)
# what a key may carry in CKA_EC_PARAMS: the OID, or PKCS#11 3.0's PrintableString curve
# name (SoftHSM2 gives its generated private keys "edwards25519")
_ED25519_NAMES = (ED25519_PARAMS, b"\x13\x0cedwards25519")
URI_SCHEME = "pkcs11:"
_PATH_ATTRS = frozenset({"token", "object", "id", "serial", "manufacturer", "model", "type"})


class Pkcs11Error(ValueError):
    """The token, its module, its PIN or its key: one line, no secret."""


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """The path attributes of an RFC 7512 URI that find one Ed25519 key pair."""

    text: str
    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    serial: str | None = None

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """``[pkcs11]``: the module (shared library) and the user PIN (``${ENV}`` in the file)."""

    module: Path
    pin: str = field(repr=False)


def is_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(URI_SCHEME)


def parse_uri(text: str) -> Pkcs11Uri:
    """``pkcs11:token=…;object=…[;id=%01…][;type=private]``. The PIN never goes in the
    URI (``pin-value`` and every query attribute are refused: use ``[pkcs11] pin``)."""
    if not is_uri(text):
        raise Pkcs11Error(f"not a pkcs11: URI: {text!r}")
    path, _, query = text[len(URI_SCHEME):].partition("?")
    if query:
        raise Pkcs11Error(f"{text}: query attributes (…?{query.split('=')[0]}=…) are not "
                          "supported: give the module and the PIN in [pkcs11]")
    attrs: dict[str, bytes] = {}
    for part in filter(None, path.split(";")):
        name, eq, value = part.partition("=")
        if not eq or name not in _PATH_ATTRS:
            raise Pkcs11Error(f"{text}: unknown or malformed attribute {part!r} (known: "
                              f"{', '.join(sorted(_PATH_ATTRS))})")
        if name in attrs:
            raise Pkcs11Error(f"{text}: attribute {name!r} given twice")
        attrs[name] = unquote_to_bytes(value)
    if attrs.get("type", b"private") != b"private":
        raise Pkcs11Error(f"{text}: type must be private (the signing key)")
    if "token" not in attrs and "serial" not in attrs:
        raise Pkcs11Error(f"{text}: name the token (token=LABEL or serial=…)")
    if "object" not in attrs and "id" not in attrs:
        raise Pkcs11Error(f"{text}: name the key (object=LABEL or id=%XX…)")
    try:
        strings = {k: attrs[k].decode("utf-8") for k in ("token", "object", "serial")
                   if k in attrs}
    except UnicodeDecodeError:
        raise Pkcs11Error(f"{text}: token, object and serial must be UTF-8") from None
    return Pkcs11Uri(text, id=attrs.get("id"), **strings)


def _pkcs11():
    try:
        import pkcs11
    except ImportError:  # pragma: no cover - a dependency of fedgate
        raise Pkcs11Error("python-pkcs11 is not installed (pip install python-pkcs11)") from None
    return pkcs11


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    return {"PinIncorrect": "the PIN is wrong (CKR_PIN_INCORRECT)",
            "PinLocked": "the token's user PIN is locked (CKR_PIN_LOCKED)",
            "PinLenRange": "the PIN has the wrong length (CKR_PIN_LEN_RANGE)",
            "UserPinNotInitialized": "the token has no user PIN (not initialised)",
            "TokenNotPresent": "the token is not present",
            "DeviceRemoved": "the token was removed"}.get(name, f"{name} {exc}".strip())


# PKCS#11 logs in per application, not per session: one C_Login makes every session of
# the process a user session, and C_Logout (python-pkcs11 calls it when a logged-in
# session closes) ends it for all of them. So the process keeps ONE login session per
# token, counted: signers and key commands open their own sessions without the PIN, and
# the login ends when the last of them closes. Two signers in one process (the one a
# SIGHUP reload replaces and its successor; a self-test beside the gateway) then neither
# fail to log in (CKR_USER_ALREADY_LOGGED_IN) nor log each other out.
_LOGINS: dict[tuple[str, str, str], list[Any]] = {}  # (module, label, serial) → [session, users]
_LOGINS_LOCK = threading.Lock()


class TokenSession:
    """A session on the token (the python-pkcs11 ``Session``'s methods, by delegation)
    that holds one use of the process's login until :meth:`close`."""

    def __init__(self, session: Any, login: tuple[str, str, str]) -> None:
        self._session, self._login = session, login

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def __enter__(self) -> TokenSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._session is None:
            return
        session, self._session = self._session, None
        try:
            session.close()  # opened without the PIN: no C_Logout
        finally:
            _release(self._login)


def _release(login: tuple[str, str, str]) -> None:
    with _LOGINS_LOCK:
        held = _LOGINS[login]
        held[1] -= 1
        if held[1] == 0:
            del _LOGINS[login]
            with contextlib.suppress(_pkcs11().exceptions.PKCS11Error):
                held[0].close()  # the last user: C_Logout, then close


def open_session(config: Pkcs11Config, uri: Pkcs11Uri, *, rw: bool = False) -> TokenSession:
    """A user session on the token ``uri`` names (the process's login, made on first use
    with the configured PIN); Pkcs11Error otherwise."""
    pkcs11 = _pkcs11()
    module = os.path.realpath(config.module)
    try:
        # python-pkcs11 keeps one initialised library per path string: two spellings of one
        # module (a symlink and its target) would initialise it twice in one process
        lib = pkcs11.lib(module)
    except (OSError, RuntimeError) as exc:
        raise Pkcs11Error(f"{uri}: cannot load the PKCS#11 module {config.module} "
                          f"({_describe(exc)})") from None
    where = {k: v for k, v in (("token_label", uri.token), ("token_serial",
             uri.serial.encode() if uri.serial else None)) if v is not None}
    try:
        token = lib.get_token(**where)
    except pkcs11.exceptions.NoSuchToken:
        raise Pkcs11Error(f"{uri}: no such token in {config.module} (is SOFTHSM2_CONF or "
                          "the module right?)") from None
    except pkcs11.exceptions.MultipleTokensReturned:
        raise Pkcs11Error(f"{uri}: several tokens match: add serial=…") from None
    except pkcs11.exceptions.PKCS11Error as exc:
        raise Pkcs11Error(f"{uri}: {_describe(exc)}") from None
    login = (module, str(token.label), str(getattr(token, "serial", b"")))
    with _LOGINS_LOCK:
        if login not in _LOGINS:
            try:
                _LOGINS[login] = [token.open(user_pin=config.pin), 0]
            except pkcs11.exceptions.PKCS11Error as exc:
                raise Pkcs11Error(f"{uri}: cannot log in: {_describe(exc)}") from None
        _LOGINS[login][1] += 1
    try:
        return TokenSession(token.open(rw=rw), login)
    except pkcs11.exceptions.PKCS11Error as exc:
        _release(login)
        raise Pkcs11Error(f"{uri}: cannot open a session: {_describe(exc)}") from None
    except BaseException:
        _release(login)
        raise


def _find(session, uri: Pkcs11Uri, object_class) -> list:
    pkcs11 = _pkcs11()
    A = pkcs11.Attribute
    template = {A.CLASS: object_class}
    if uri.object is not None:
        template[A.LABEL] = uri.object
    if uri.id is not None:
        template[A.ID] = uri.id
    return list(session.get_objects(template))


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
        pkcs11 = _pkcs11()
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
        private = _find(self._session, self.uri, Obj.PRIVATE_KEY)
        public = _find(self._session, self.uri, Obj.PUBLIC_KEY)
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
                raise Pkcs11Error(f"{self.uri}: signing failed: {_describe(exc)}") from None

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
    pkcs11 = _pkcs11()
    for cls in (pkcs11.ObjectClass.PRIVATE_KEY, pkcs11.ObjectClass.PUBLIC_KEY):
        if _find(session, uri, cls):
            raise Pkcs11Error(f"{uri}: a key with this label/id exists; refusing to add another")


def generate_key(config: Pkcs11Config, uri: Pkcs11Uri) -> bytes:
    """A new Ed25519 pair generated inside the token (never extractable); its public key."""
    pkcs11 = _pkcs11()
    with open_session(config, uri, rw=True) as session:
        _refuse_existing(session, uri)
        public, private = _templates(pkcs11, uri)
        try:
            pub, _ = session.generate_keypair(
                pkcs11.KeyType.EC_EDWARDS, public_template=public, private_template=private,
                mechanism=pkcs11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN)
        except pkcs11.exceptions.PKCS11Error as exc:
            raise Pkcs11Error(f"{uri}: key generation failed: {_describe(exc)}") from None
        return public_bytes(pub[pkcs11.Attribute.EC_POINT])


def import_seed(config: Pkcs11Config, uri: Pkcs11Uri, seed: bytes) -> bytes:
    """Put an existing Ed25519 seed into the token as a non-extractable private key plus
    its public key object (migrating a file key; the tests' vector seed); its public key."""
    import nacl.bindings

    pkcs11 = _pkcs11()
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
            raise Pkcs11Error(f"{uri}: import failed: {_describe(exc)}") from None
    return public_key
