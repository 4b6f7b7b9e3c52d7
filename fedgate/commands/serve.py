"""`fedgate serve` (one process or --workers N) and `fedgate probe` (GET /readyz over
emit's pinned mTLS)."""

from __future__ import annotations

import argparse
import sys


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.http.server import serve
    from gateway.http.workers import serve_workers

    overrides = {"format": args.log_format, "level": args.log_level,
                 "access": args.access_log}
    logs.configure(logs.LogSettings().merged(overrides))  # until the config file is read
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if args.workers == 1:
        serve(args.config, log_overrides=overrides)
        return 0
    return serve_workers(args.config, args.workers, log_overrides=overrides)


def cmd_probe(args: argparse.Namespace) -> int:
    """GET /readyz through the transport ``fedgate emit`` uses (same TLS context, same
    server_pins check): a gateway that emit would refuse is never reported healthy."""
    import asyncio

    from common.tls import client_context
    from emitter.settings import load_transport_settings
    from emitter.transport import TRANSPORT_ERRORS, classify, get, open_session

    if not args.timeout > 0:
        raise ValueError("--timeout must be a positive number of seconds")
    settings = load_transport_settings(args.config)  # ${NAME}, relative paths: as emit
    ctx = client_context(settings.ca, settings.cert, settings.key)
    url = settings.url + "/readyz"

    async def probe() -> int:
        async with open_session(ctx, settings.server_pins, args.timeout) as session:
            status, _, _ = await get(session, url, ssl_context=ctx)
            return status

    try:
        status = asyncio.run(probe())
    except TRANSPORT_ERRORS as exc:
        failure = classify(exc)
        line = " ".join(f"fedgate: probe: {url}: {failure.code}: {failure.detail}".split())
        print(line[:1000], file=sys.stderr)
        return 1
    if status != 200:
        print(f"fedgate: probe: {url}: answered {status}", file=sys.stderr)
        return 1
    print(f"{url}: {status}")
    return 0
