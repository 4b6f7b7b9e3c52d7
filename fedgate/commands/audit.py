"""`fedgate audit verify FILE…`, `fedgate audit rotate` and `fedgate audit ship` (to the
[audit.syslog] SIEM)."""

from __future__ import annotations

import argparse
import sys

from common.tomlfile import ConfigError


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """0 intact (count, last hash, checkpoint coverage on stdout); 1 broken chain, missing
    file, cut tail or bad checkpoint; 2 unreadable file or key."""
    from audit.checkpoints import sidecar_path
    from audit.coverage import VerifyFailed, load_checkpoint_keys, verify_files

    files = args.file
    names = " + ".join(str(f) for f in files)
    sidecar = args.checkpoint
    if sidecar is None and sidecar_path(files[-1]).is_file():
        sidecar = sidecar_path(files[-1])  # the appender's own, next to the newest file
    try:
        keys = load_checkpoint_keys(args.checkpoint_key) if args.checkpoint_key else None
    except (OSError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else _reason(exc)
        print(f"fedgate: error: {args.checkpoint_key}: {reason}", file=sys.stderr)
        return 2
    try:
        coverage = verify_files(files, keys, sidecar)
    except OSError as exc:
        print(f"fedgate: error: {exc.filename or names}: {_reason(exc)}", file=sys.stderr)
        return 2
    except VerifyFailed as exc:
        print(f"fedgate: error: {exc}", file=sys.stderr)
        return 1
    print(f"{names}: {coverage}")
    return 0


def _reason(exc: OSError) -> str:
    return _OS_REASONS.get(type(exc)) or (exc.strerror or str(exc)).lower()


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


def cmd_audit_rotate(args: argparse.Namespace) -> int:
    """Move the audit file aside; the new file continues the chain (docs/AUDIT.md)."""
    from audit.chain import AuditError, AuditLog
    from audit.checkpoints import Checkpointer
    from audit.rotate import default_target, rotate
    from gateway.config.settings import load_checkpoint_key, load_settings

    settings = load_settings(args.config)
    path, cfg = settings.audit_path, settings.audit_checkpoints
    key = load_checkpoint_key(settings)
    cp = None if cfg is None or key is None else Checkpointer(
        key, cfg.kid, every_events=cfg.every_events, every_s=cfg.every_s)
    target = args.to if args.to is not None else default_target(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file: nothing to rotate")
    try:
        with AuditLog(path) as log:
            start = rotate(log, target, cp)
    except (AuditError, OSError) as exc:
        print(f"fedgate: error: {path}: {exc}", file=sys.stderr)
        return 1
    signed = "ends with a checkpoint" if cp is not None else "not signed (no checkpoint_key)"
    print(f"{path}: rotated to {target} ({signed}); the new file continues at sequence {start}")
    return 0
