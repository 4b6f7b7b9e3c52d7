"""Sessions on a PKCS#11 token, sharing one counted login per token in the process.

PKCS#11 logs in per application, not per session (see below), so every session a signer
or a key command opens goes through :func:`open_session`, which logs in with the PIN on
first use and logs out when the last :class:`TokenSession` closes; :func:`find_objects`
looks a key's objects up by the URI's label and id. ``python-pkcs11`` is
imported lazily (:func:`pkcs11_module`): a file-key deployment never loads it. SoftHSM2
reads ``SOFTHSM2_CONF`` once, when the module is first loaded in a process: set it in the
environment before starting.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from .pkcs11_uri import Pkcs11Config, Pkcs11Error, Pkcs11Uri


def pkcs11_module():
    try:
        import pkcs11
    except ImportError:  # pragma: no cover - a dependency of fedgate
        raise Pkcs11Error("python-pkcs11 is not installed (pip install python-pkcs11)") from None
    return pkcs11


def describe(exc: BaseException) -> str:
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
            with contextlib.suppress(pkcs11_module().exceptions.PKCS11Error):
                held[0].close()  # the last user: C_Logout, then close


def open_session(config: Pkcs11Config, uri: Pkcs11Uri, *, rw: bool = False) -> TokenSession:
    """A user session on the token ``uri`` names (the process's login, made on first use
    with the configured PIN); Pkcs11Error otherwise."""
    pkcs11 = pkcs11_module()
    module = os.path.realpath(config.module)
    try:
        # python-pkcs11 keeps one initialised library per path string: two spellings of one
        # module (a symlink and its target) would initialise it twice in one process
        lib = pkcs11.lib(module)
    except (OSError, RuntimeError) as exc:
        raise Pkcs11Error(f"{uri}: cannot load the PKCS#11 module {config.module} "
                          f"({describe(exc)})") from None
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
        raise Pkcs11Error(f"{uri}: {describe(exc)}") from None
    login = (module, str(token.label), str(getattr(token, "serial", b"")))
    with _LOGINS_LOCK:
        if login not in _LOGINS:
            try:
                _LOGINS[login] = [token.open(user_pin=config.pin), 0]
            except pkcs11.exceptions.PKCS11Error as exc:
                raise Pkcs11Error(f"{uri}: cannot log in: {describe(exc)}") from None
        _LOGINS[login][1] += 1
    try:
        return TokenSession(token.open(rw=rw), login)
    except pkcs11.exceptions.PKCS11Error as exc:
        _release(login)
        raise Pkcs11Error(f"{uri}: cannot open a session: {describe(exc)}") from None
    except BaseException:
        _release(login)
        raise


def find_objects(session, uri: Pkcs11Uri, object_class) -> list:
    pkcs11 = pkcs11_module()
    A = pkcs11.Attribute
    template = {A.CLASS: object_class}
    if uri.object is not None:
        template[A.LABEL] = uri.object
    if uri.id is not None:
        template[A.ID] = uri.id
    return list(session.get_objects(template))
