"""`fedgate bootstrap DIR` (a whole dev federation) and `fedgate demo`."""

from __future__ import annotations

import argparse

from .certs import flag_named


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from fedgate.bootstrap import bootstrap
    from fedgate.pki import PkiError

    hosts = tuple(dict.fromkeys(["localhost", "127.0.0.1", args.host]))
    try:
        layout = bootstrap(args.dir, store_url=args.store_url, host=args.host, port=args.port,
                           hosts=hosts, bind=args.bind, force=args.force)
    except PkiError as exc:
        raise ValueError(flag_named(exc)) from None
    print(f"gateway config: {layout.gateway_config}\nemitter config: {layout.emitter_config}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedgate.demo import main as demo_main

    return demo_main(args.out)
