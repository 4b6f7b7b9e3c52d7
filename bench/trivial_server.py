"""The trivial mTLS baseline (issue 9): aiohttp with the gateway's own TLS context
(``common.tls.server_context``: TLS 1.3, client certificate required), N processes on
one port (SO_REUSEPORT, as ``fedgate serve --workers N``), every POST answered 202 with
a small JSON after reading the body. Started by bench/baseline_bench.py.

    python bench/trivial_server.py --port P --cert C --key K --ca CA [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from aiohttp import web  # noqa: E402

from common.tls import server_context  # noqa: E402


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"accepted": True, "request_id": "trivial"}, status=202)


async def serve(args) -> None:
    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = server_context(Path(args.cert), Path(args.key), Path(args.ca))
    await web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=ctx,
                      reuse_port=True).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--cert", "--key", "--ca"):
        parser.add_argument(name, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            asyncio.run(serve(args))
            os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *a: None)  # replaced by the loop's handler
    try:
        asyncio.run(serve(args))
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
