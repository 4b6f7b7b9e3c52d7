"""A lean HTTP/1.1 client over keep-alive mTLS connections, for the latency benchmark.

aiohttp's client spends ~300-450 µs of CPU per request on this machine, on the same two
cores as the server it measures: at half the maximum rate it queues behind itself, and
the trivial handler then shows a p99 near 100 ms (docs/PERFORMANCE.md). This one writes
a prepared request and reads the status line, the headers and ``Content-Length`` bytes
of body, no more (asyncio streams over ``ssl``): a request costs the client a fraction
of that, so more of a measured latency is the server's.

Only what the benchmark needs: POST, identity bodies, answers with ``Content-Length``
(fedgate's and the trivial handler's); anything else is an error, never a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit


class LeanConnection:
    """One keep-alive connection; ``post`` → (status, body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str, context: ssl.SSLContext) -> LeanConnection:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 443
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        return cls(reader, writer, f"{host}:{port}")

    def request(self, path: str, headers: dict[str, str], body: bytes) -> bytes:
        """The request's bytes (prepared before the clock starts)."""
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}",
                *(f"{k}: {v}" for k, v in headers.items()),
                f"Content-Length: {len(body)}", "", ""]
        return "\r\n".join(head).encode("latin-1") + body

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
            elif name.strip().lower() == "transfer-encoding":
                raise RuntimeError(f"answer with Transfer-Encoding {value.strip()}")
        if length is None:
            raise RuntimeError("answer without Content-Length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


class LeanPool:
    """``size`` connections; a request waits for an idle one (first come, first served)."""

    def __init__(self, url: str, context: ssl.SSLContext, size: int) -> None:
        self.url, self.context, self.size = url, context, size
        self.idle: asyncio.Queue[LeanConnection] = asyncio.Queue()
        self.conns: list[LeanConnection] = []

    async def __aenter__(self) -> LeanPool:
        self.conns = list(await asyncio.gather(*(
            LeanConnection.open(self.url, self.context) for _ in range(self.size))))
        for conn in self.conns:
            self.idle.put_nowait(conn)
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(conn.close() for conn in self.conns))

    def request(self, headers: dict[str, str], body: bytes) -> bytes:
        return self.conns[0].request(urlsplit(self.url).path, headers, body)

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        conn = await self.idle.get()
        answer = await conn.send(raw)  # a failure leaves it out: the run stops on it
        self.idle.put_nowait(conn)
        return answer
