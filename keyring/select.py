"""Which keys may verify a request (PROTOCOL.md §4 step 5). Pure: no I/O, "now" passed in.

- With an explicit kid: that key, if it exists, belongs to the claimed identity and its
  status and window allow it now. A kid of another identity is ``unknown_kid`` for this
  one (the caller learns nothing about other identities' keys).
- Without a kid: every key of the identity valid now, in keyring order. Never "the only
  key" of the keyring.
"""

from __future__ import annotations

from .keys import Key, Keyring


class KeySelectionError(Exception):
    """``code`` is ``unknown_kid`` or ``key_not_valid`` (PROTOCOL.md §4 step 5)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def candidate_keys(keyring: Keyring, identity: str, kid: str | None, now: int) -> tuple[Key, ...]:
    """The keys to try, in order; raise KeySelectionError when there is none."""
    if kid is not None:
        key = keyring.get(kid)
        if key is None or key.identity != identity:
            raise KeySelectionError("unknown_kid", f"kid {kid!r} is not a key of {identity!r}")
        if not key.valid_at(now):
            raise KeySelectionError(
                "key_not_valid", f"key {kid!r} is {key.status.value} or outside its validity window"
            )
        return (key,)
    keys = keyring.for_identity(identity)
    if not keys:
        raise KeySelectionError("unknown_kid", f"identity {identity!r} has no keys")
    valid = tuple(key for key in keys if key.valid_at(now))
    if not valid:
        raise KeySelectionError("key_not_valid", f"no key of {identity!r} is valid now")
    return valid
