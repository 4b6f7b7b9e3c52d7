"""An unauthenticated connection flood, and half-sent requests, against a gateway.

Run as a process (the attacker, with its own CPU and descriptors):

    python tests/flood.py --port PORT [--raw 2000] [--seconds 25]

holds ``--raw`` plain TCP connections that never send a byte, re-opening each one as soon
as the server closes it, until ``--seconds`` have passed or ``MAX_OPENS`` sockets were
opened (a bounded loop); then prints one JSON line of counts. ``half_sent`` (imported by
the tests and bench/conn_flood.py) is the other attacker: a full mTLS handshake with a
certificate of the CA, then half a request's headers, then silence.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import ssl
import sys
import time

MAX_OPENS = 500_000
HALF_HEADERS = (b"POST /v1/telemetry HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nX-Service-Ident")


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))


async def _hold(host: str, port: int, counts: dict[str, int]) -> None:
    while counts["opened"] < MAX_OPENS:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["connect_errors"] += 1
            await asyncio.sleep(0.05)
            continue
        counts["opened"] += 1
        try:
            await reader.read(1)  # b"" once the server closes it
            counts["closed_by_server"] += 1
        except OSError:
            counts["closed_by_server"] += 1
        finally:
            writer.close()


async def raw_flood(host: str, port: int, n: int, seconds: float) -> dict[str, int]:
    """Until ``seconds`` have passed, every socket is done or SIGTERM arrives."""
    counts = {"opened": 0, "closed_by_server": 0, "connect_errors": 0}
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(_hold(host, port, counts)) for _ in range(n)]
    stopped = asyncio.create_task(stop.wait())
    done = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
    await asyncio.wait([done, stopped], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, stopped]:
        task.cancel()
    await asyncio.gather(*tasks, stopped, return_exceptions=True)
    return counts


async def half_sent(host: str, port: int, ctx: ssl.SSLContext, *, deadline: float,
                    wait_s: float) -> float | None:
    """Handshake (retried until ``deadline`` if the server sheds it), send half the
    headers, then wait up to ``wait_s`` for the server to close: → how long the
    connection lived after the half request, or None if the server never closed it."""
    while True:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx), timeout=10)
            writer.write(HALF_HEADERS)
            await writer.drain()
            break
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    try:
        return await lifetime(reader, wait_s)
    finally:
        writer.close()


async def lifetime(reader: asyncio.StreamReader, wait_s: float = 10.0) -> float | None:
    """Seconds until the server closes the connection (None: still open after wait_s)."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(wait_s):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except OSError:
        pass  # reset by the server: closed too
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--raw", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=25.0)
    args = parser.parse_args()
    raise_fd_limit(args.raw + 64)
    counts = asyncio.run(raw_flood(args.host, args.port, args.raw, args.seconds))
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
