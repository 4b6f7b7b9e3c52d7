"""Keys by kid: the frozen ``Key``, JWKS (RFC 8037) load/save with fedgate's members.

A JWK here is ``{"kty":"OKP","crv":"Ed25519","x":<b64url 32 bytes>,"kid":…}`` plus
``status`` (active|retired|revoked), optional ``not_before``/``not_after`` (Unix
seconds) and, for producer keys, ``identity`` and ``tenants`` (the key's tenant domain).
Loading is strict: a malformed or duplicate kid, a wrong curve, a private member or an
unknown status refuses the whole file with one line naming the key.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

KID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
IDENTITY_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_KNOWN_MEMBERS = frozenset(
    {"kty", "crv", "x", "kid", "alg", "use", "status", "not_before", "not_after",
     "identity", "tenants"}
)


class KeyringError(ValueError):
    """A key file that cannot be trusted; the message names the key."""


class KeyStatus(StrEnum):
    ACTIVE = "active"
    RETIRED = "retired"  # verify-only: still accepted inside its window
    REVOKED = "revoked"  # never accepted


@dataclass(frozen=True, slots=True)
class Key:
    kid: str
    public: bytes  # 32-byte raw Ed25519 public key
    status: KeyStatus = KeyStatus.ACTIVE
    not_before: int | None = None
    not_after: int | None = None
    identity: str | None = None
    tenants: frozenset[str] = field(default_factory=frozenset)

    def valid_at(self, now: int) -> bool:
        """Status and validity window allow verifying at ``now`` (bounds inclusive)."""
        if self.status is KeyStatus.REVOKED:
            return False
        if self.not_before is not None and now < self.not_before:
            return False
        return not (self.not_after is not None and now > self.not_after)

    def to_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = {
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": self.kid,
            "x": b64url_encode(self.public), "status": self.status.value,
        }
        if self.not_before is not None:
            jwk["not_before"] = self.not_before
        if self.not_after is not None:
            jwk["not_after"] = self.not_after
        if self.identity is not None:
            jwk["identity"] = self.identity
        if self.tenants:
            jwk["tenants"] = sorted(self.tenants)
        return jwk


class Keyring(Mapping[str, Key]):
    """Immutable map kid → Key. A missing kid is an error, never "the only key"."""

    def __init__(self, keys: Iterable[Key] = ()) -> None:
        by_kid: dict[str, Key] = {}
        for key in keys:
            if key.kid in by_kid:
                raise KeyringError(f"duplicate kid {key.kid!r}")
            by_kid[key.kid] = key
        self._by_kid = by_kid
        by_identity: dict[str, list[Key]] = {}
        for key in by_kid.values():
            if key.identity is not None:
                by_identity.setdefault(key.identity, []).append(key)
        self._by_identity = {k: tuple(v) for k, v in by_identity.items()}

    def __getitem__(self, kid: str) -> Key:
        return self._by_kid[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_kid)

    def __len__(self) -> int:
        return len(self._by_kid)

    def for_identity(self, identity: str) -> tuple[Key, ...]:
        return self._by_identity.get(identity, ())

    def to_jwks(self) -> dict[str, Any]:
        return {"keys": [key.to_jwk() for key in self._by_kid.values()]}


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


def _opt_int(jwk: Mapping[str, Any], name: str, where: str) -> int | None:
    value = jwk.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise KeyringError(f"{where}: {name} must be Unix seconds (a non-negative integer)")
    return value


def _tenants(jwk: Mapping[str, Any], where: str) -> frozenset[str]:
    tenants = jwk.get("tenants", [])
    if not isinstance(tenants, list) or not all(isinstance(t, str) and t for t in tenants):
        raise KeyringError(f"{where}: tenants must be a list of tenant ids")
    return frozenset(tenants)


def key_from_jwk(jwk: Any, index: int = 0) -> Key:
    """One JWK → Key; raise KeyringError naming the key on any defect."""
    if not isinstance(jwk, Mapping):
        raise KeyringError(f"key #{index}: not a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
        raise KeyringError(f"key #{index}: malformed kid {kid!r}")
    where = f"key {kid!r}"
    if "d" in jwk:
        raise KeyringError(f"{where}: private member 'd' in a public keyring")
    unknown = set(jwk) - _KNOWN_MEMBERS
    if unknown:
        raise KeyringError(f"{where}: unknown member(s) {sorted(unknown)}")
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise KeyringError(f"{where}: not an Ed25519 OKP key (kty/crv)")
    if jwk.get("alg", "EdDSA") not in ("EdDSA", "Ed25519"):
        raise KeyringError(f"{where}: alg must be EdDSA")
    try:
        public = b64url_decode(jwk.get("x", ""))
    except ValueError:
        raise KeyringError(f"{where}: x is not base64url") from None
    if len(public) != 32:
        raise KeyringError(f"{where}: x must be 32 bytes, got {len(public)}")
    try:
        status = KeyStatus(jwk.get("status", "active"))
    except ValueError:
        raise KeyringError(f"{where}: unknown status {jwk.get('status')!r}") from None
    identity = jwk.get("identity")
    if identity is not None and not (isinstance(identity, str) and IDENTITY_RE.fullmatch(identity)):
        raise KeyringError(f"{where}: malformed identity {identity!r}")
    return Key(kid=kid, public=public, status=status,
               not_before=_opt_int(jwk, "not_before", where),
               not_after=_opt_int(jwk, "not_after", where),
               identity=identity, tenants=_tenants(jwk, where))


def parse_jwks(doc: Any) -> Keyring:
    """A JWKS document (``{"keys": [...]}``) → Keyring."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise KeyringError('not a JWKS document (want {"keys": [...]})')
    return Keyring(key_from_jwk(jwk, i) for i, jwk in enumerate(doc["keys"]))


def load_jwks(path: str | Path) -> Keyring:
    """Read a JWKS file; any defect (I/O, JSON, key) is a KeyringError naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyringError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise KeyringError(f"{path}: not JSON ({exc})") from None
    try:
        return parse_jwks(doc)
    except KeyringError as exc:
        raise KeyringError(f"{path}: {exc}") from None


def save_jwks(path: str | Path, keyring: Keyring) -> None:
    Path(path).write_text(json.dumps(keyring.to_jwks(), indent=2) + "\n", encoding="utf-8")


def add_to_jwks(path: str | Path, key: Key) -> None:
    """Append ``key``'s public JWK to the JWKS file ``path`` (created, mode 0644, when
    missing), atomically: the new file is written beside it and renamed over it, under
    an exclusive lock on the directory (two writers never lose each other's key). The
    other keys and members are kept as they are. KeyringError (one line naming the file)
    when the existing file is not a JWKS this loader accepts or already holds the kid."""
    path = Path(os.path.realpath(path))  # replace a symlink's target, not the link
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise KeyringError(f"{path}: cannot open its directory ({exc.strerror})") from None
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            doc: Any = {"keys": []}
            mode = 0o644
        except OSError as exc:
            raise KeyringError(f"{path}: cannot read ({exc.strerror})") from None
        else:
            try:
                doc = json.loads(raw)
            except ValueError as exc:
                raise KeyringError(f"{path}: not JSON ({exc})") from None
            mode = stat.S_IMODE(path.stat().st_mode)
        try:
            existing = parse_jwks(doc)
        except KeyringError as exc:
            raise KeyringError(f"{path}: {exc}") from None
        if key.kid in existing:
            raise KeyringError(f"{path}: kid {key.kid!r} is already in this keyring")
        doc["keys"].append(key.to_jwk())
        parse_jwks(doc)  # what is written loads
        data = (json.dumps(doc, indent=2) + "\n").encode()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)  # releases the lock
