"""`fedgate keys revoke` and `fedgate keys revoked`: the kill switch (PROTOCOL.md §8 v1.1).

``revoke`` writes the kid into the store named by the gateway's config and signals it;
every gateway sharing that store refuses the key within 1 s (docs/OPERATIONS.md,
"Revoking a key"). Final: there is no un-revoke; give the producer a new key and kid.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from datetime import UTC, datetime

REASON_RE = re.compile(r"[^\x00-\x1f\x7f]{0,500}")  # one line, no control characters


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _with_store(settings, action):
    from gateway.store import open_store

    store = open_store(settings.store_url, **settings.store_options)
    try:
        await store.open()
        return await action(store)
    finally:
        await store.close()


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from gateway.config.settings import load_producer_keyring, load_settings

    if not REASON_RE.fullmatch(args.reason):
        raise ValueError("--reason must be one line of at most 500 characters")
    settings = load_settings(args.config)
    if args.kid not in load_producer_keyring(settings):  # a typo revokes nothing
        raise ValueError(f"kid {args.kid!r} is not in {settings.producer_keyring}; "
                         "nothing revoked")
    now = int(time.time())
    rev = asyncio.run(_with_store(settings, lambda s: s.revoke_key(args.kid, args.reason, now)))
    if rev.revoked_at != now or rev.reason != args.reason:
        print(f"fedgate: {args.kid} was already revoked at {_when(rev.revoked_at)} "
              f"(reason: {rev.reason or '-'}); signalled again", file=sys.stderr)
    else:
        print(f"fedgate: revoked {args.kid} at {_when(now)}: every gateway sharing the store "
              "refuses it within 1 s", file=sys.stderr)
    return 0


def cmd_keys_revoked(args: argparse.Namespace) -> int:
    from gateway.config.settings import load_settings

    settings = load_settings(args.config)
    revoked = asyncio.run(_with_store(settings, lambda s: s.revoked_keys()))
    for rev in sorted(revoked.values(), key=lambda r: (r.revoked_at, r.kid)):
        print(f"{rev.kid}\t{_when(rev.revoked_at)}\t{rev.reason}")
    if not revoked:
        print("fedgate: no revoked keys", file=sys.stderr)
    return 0
