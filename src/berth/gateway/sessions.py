"""The HTTP client sessions berth talks to model servers with, opened and closed with the app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from berth.core import pooled

# Idle connections are dropped before llama-server's (cpp-httplib's) 5 s keep-alive timeout closes
# them from its side, so a request rarely meets a connection that is already gone.
KEEPALIVE_SECONDS = 4.0


class UpstreamSessions:
    def __init__(self) -> None:
        self._control: aiohttp.ClientSession | None = None
        self._proxy: aiohttp.ClientSession | None = None

    @property
    def control(self) -> aiohttp.ClientSession:
        """For berth's own calls to model servers (health, warmup, slots)."""
        assert self._control is not None, "sessions are opened when the app starts"
        return self._control

    @property
    def proxy(self) -> aiohttp.ClientSession:
        """For forwarding client requests: never decompresses (a gzip body stays gzip, with its header)."""
        assert self._proxy is not None, "sessions are opened when the app starts"
        return self._proxy

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """For `app.cleanup_ctx`."""
        self._control = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._proxy = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS), auto_decompress=False,
            trace_configs=[pooled.reuse_tracing()])
        try:
            yield
        finally:
            await self._control.close()
            await self._proxy.close()
