"""`fedgate selftest [--config FILE]`: the gateway's start-up known-answer tests on demand
(gateway/selftest.py), one line per test; the feedback key's test (through the PKCS#11
token when it is one) only with --config. Exit 0 all passed, 1 one failed, 2 the config
file itself is unusable."""

from __future__ import annotations

import argparse

from gateway.config.settings import load_settings
from gateway.selftest import Result, run_all
from keyring.signer import open_signer


def cmd_selftest(args: argparse.Namespace) -> int:
    signer, failed_open = None, None
    if args.config is not None:
        settings = load_settings(args.config)  # ConfigError: one line, exit 2
        try:
            signer = open_signer(settings.feedback_key, settings.feedback_kid,
                                 pkcs11=settings.pkcs11)
        except ValueError as exc:  # a missing or locked token is a failed test
            failed_open = Result("feedback_signer", False, str(exc))
    try:
        results = run_all(signer)
    finally:
        if signer is not None:
            signer.close()
    if failed_open is not None:
        results.append(failed_open)
    for result in results:
        print(f"{result.name}: ok" if result.ok else f"{result.name}: FAIL: {result.detail}")
    return 0 if all(r.ok for r in results) else 1
