"""`fedgate audit verify FILE` and `fedgate audit ship` (to the [audit.syslog] SIEM)."""

from __future__ import annotations

import argparse
import sys

from audit.chain import verify_lines
from common.tomlfile import ConfigError


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """0 intact (count and last hash on stdout); 1 broken chain; 2 unreadable file."""
    try:
        with open(args.file, "rb") as fh:
            result = verify_lines(fh)
    except OSError as exc:
        reason = _OS_REASONS.get(type(exc)) or (exc.strerror or str(exc)).lower()
        print(f"fedgate: error: {args.file}: {reason}", file=sys.stderr)
        return 2
    if result.ok:
        print(f"{args.file}: {result}")
        return 0
    print(f"fedgate: error: {args.file}: {result}", file=sys.stderr)
    return 1


def cmd_audit_ship(args: argparse.Namespace) -> int:
    from audit.ship_run import run_shipper
    from gateway.config.settings import load_settings

    settings = load_settings(args.config)
    if settings.audit_syslog is None:
        raise ConfigError(f"{settings.path}: no [audit.syslog] table: nowhere to ship to")
    return run_shipper(settings.audit_path, settings.audit_syslog, once=args.once,
                       progress_s=args.progress)


_OS_REASONS = {FileNotFoundError: "no such file", IsADirectoryError: "is a directory",
               PermissionError: "permission denied"}
