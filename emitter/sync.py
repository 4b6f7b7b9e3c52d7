"""``SyncEmitterClient``: the async client for scripts, on a private event loop.

One ``asyncio.Runner`` lives as long as the client (``with SyncEmitterClient(...)``), so
the aiohttp session and its pinned connections are reused between calls; do not use it
from inside a running event loop (use ``EmitterClient`` there).
"""

from __future__ import annotations

import asyncio
from typing import Any

from .client import DeliveryResult, EmitterClient
from .settings import EmitterSettings, load_emitter_settings


class SyncEmitterClient:
    def __init__(self, settings: EmitterSettings | str, **kwargs: Any) -> None:
        if not isinstance(settings, EmitterSettings):
            settings = load_emitter_settings(settings)
        self._runner: asyncio.Runner | None = asyncio.Runner()
        try:  # the client is built inside the loop it will use
            self._client: EmitterClient = self._run(self._open(settings, kwargs))
        except BaseException:
            self._runner.close()
            self._runner = None
            raise

    @staticmethod
    async def _open(settings: EmitterSettings, kwargs: dict[str, Any]) -> EmitterClient:
        return await EmitterClient(settings, **kwargs).open()

    def _run(self, coro):
        if self._runner is None:
            coro.close()
            raise RuntimeError("SyncEmitterClient is closed")
        return self._runner.run(coro)

    @property
    def client(self) -> EmitterClient:
        """The wrapped async client (its outbox and ledger are plain attributes)."""
        return self._client

    def send_telemetry(self, body: dict[str, Any]) -> DeliveryResult:
        return self._run(self._client.send_telemetry(body))

    def send_graph(self, body: dict[str, Any]) -> DeliveryResult:
        return self._run(self._client.send_graph(body))

    def flush(self) -> list[DeliveryResult]:
        return self._run(self._client.flush())

    def query_feedback(self, tenant_id: str, operator_id: str,
                       limit: int = 100) -> list[dict[str, Any]]:
        return self._run(self._client.query_feedback(tenant_id, operator_id, limit))

    def close(self) -> None:
        if self._runner is not None:
            try:
                self._runner.run(self._client.close())
            finally:
                self._runner.close()
                self._runner = None

    def __enter__(self) -> SyncEmitterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
