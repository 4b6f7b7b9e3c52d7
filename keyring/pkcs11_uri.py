"""How a deployment names a key in a PKCS#11 token: the RFC 7512 URI and ``[pkcs11]``.

Plain values, checked when the config is read; nothing here touches a token or imports
``python-pkcs11``, so the config loaders (gateway and emitter) can use them on a
file-key deployment too. The PIN lives only in ``[pkcs11]`` (through ``${ENV}``), never
in the URI. Every failure is a :class:`Pkcs11Error` (a ``ValueError``): one line naming
the URI and the reason, never the PIN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

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

