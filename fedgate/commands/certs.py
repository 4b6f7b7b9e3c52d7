"""`fedgate certs init|issue`: the dev PKI (fedgate.pki)."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_certs_init(args: argparse.Namespace) -> int:
    from fedgate.pki import PkiError, init_pki

    kwargs = {"days": args.days, "force": args.force}
    if args.host:
        kwargs["hosts"] = args.host
    try:
        result = init_pki(args.dir, args.identity or ["spectrastrike-producer"], **kwargs)
    except PkiError as exc:
        raise ValueError(flag_named(exc)) from None
    print(json.dumps(result.pins, indent=2))
    print(f"fedgate: wrote dev PKI to {args.dir} (pins in {result.pins_path})", file=sys.stderr)
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from fedgate.pki import PkiError, issue_client_cert

    if not (args.dir / "ca.crt").is_file() or not (args.dir / "ca.key").is_file():
        raise ValueError(f"{args.dir}: no dev CA here (ca.crt and ca.key, as 'fedgate "
                         "certs init' writes them)")
    try:
        issued = issue_client_cert(args.dir, args.identity, days=args.days, force=args.force)
    except PkiError as exc:
        raise ValueError(flag_named(exc)) from None
    print(json.dumps({"identity": issued.name, "sha256": issued.sha256, "spki": issued.spki},
                     indent=2))
    pins = args.dir / "pins.json"
    where = f"pin recorded in {pins}" if pins.exists() else f"no {pins}: pin not recorded"
    print(f"fedgate: wrote {issued.cert} and {issued.key} ({where})", file=sys.stderr)
    return 0


def flag_named(exc: Exception) -> str:
    """fedgate.pki's "(use force)" names the keyword; on the command line it is --force."""
    return str(exc).replace("(use force)", "(use --force)")
