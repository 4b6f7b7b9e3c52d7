"""What a signed request is judged against, as one immutable bundle (the kill switch and
``SIGHUP``, PROTOCOL.md §8 v1.1).

The identities, their pins, the operator map (``SecurityConfig``) and the producer
keyring change while the gateway runs: ``SIGHUP`` re-reads them from the files
(gateway/http/reload.py) and ``fedgate keys revoke`` adds to the store's revoked set
(gateway/http/killswitch.py). Each change builds a new ``Trust`` and swaps it in with one
attribute assignment (``Pipeline.trust``); a request reads the attribute once, so it sees
the old world or the new one, never half of each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.config.config import SecurityConfig
from keyring import Keyring, KeyStatus


@dataclass(frozen=True, slots=True)
class Trust:
    config: SecurityConfig
    #: the file's keys with every revoked kid marked ``revoked``: §4 step 5
    #: (``candidate_keys``) then refuses it with ``key_not_valid``, with or without a kid
    keyring: Keyring
    files_keyring: Keyring  # as read from producer_keyring
    revoked: frozenset[str] = frozenset()  # the store's revoked kids (any keyring's)

    @classmethod
    def build(cls, config: SecurityConfig, keyring: Keyring,
              revoked: frozenset[str] = frozenset()) -> Trust:
        effective = keyring if not revoked & set(keyring) else Keyring(
            replace(key, status=KeyStatus.REVOKED) if key.kid in revoked else key
            for key in keyring.values())
        return cls(config, effective, keyring, frozenset(revoked))

    def with_files(self, config: SecurityConfig, keyring: Keyring) -> Trust:
        """The reloaded files, the same revocations."""
        return Trust.build(config, keyring, self.revoked)

    def with_revoked(self, revoked: frozenset[str]) -> Trust:
        return self if revoked == self.revoked else Trust.build(
            self.config, self.files_keyring, revoked)
