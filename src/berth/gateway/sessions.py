"""The HTTP client sessions berth talks to model servers with, opened and closed with the app, and the spare
connection each local model server gets after a streamed answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from berth.core import pooled
from berth.gateway.upstream import Upstream

log = logging.getLogger("berth.proxy")

# Idle connections are dropped before llama-server's (cpp-httplib's) 5 s keep-alive timeout closes
# them from its side, so a request rarely meets a connection that is already gone.
KEEPALIVE_SECONDS = 4.0
SPARE_TIMEOUT_SECONDS = 5.0  # a health check that takes longer leaves no spare (the server is busy or gone)


class UpstreamSessions:
    def __init__(self) -> None:
        self._control: aiohttp.ClientSession | None = None
        self._proxy: aiohttp.ClientSession | None = None
        self._spares: dict[str, float] = {}  # model server's base URL -> when its spare began to open
        self._opening: set[asyncio.Task[None]] = set()

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
            for task in self._opening:
                task.cancel()
            await asyncio.gather(*self._opening, return_exceptions=True)
            await self._control.close()
            await self._proxy.close()

    def open_spare(self, target: Upstream) -> None:
        """After a streamed answer from a local model server: llama-server closes the connection it streamed
        on, so its next request would first have to connect, which is most of what berth adds to the time to
        the first token at GPU speed. Its health check (`spare_path`, asked on the proxy session) leaves a
        fresh keep-alive connection in the pool for that request, opened while nobody waits. One spare per
        model server at a time: none is opened while one opened within the keep-alive time is unused."""
        if target.spare_path is None or self._proxy is None or self._proxy.closed:
            return
        opened = self._spares.get(target.base_url)
        if opened is not None and time.monotonic() - opened < KEEPALIVE_SECONDS:
            return
        self._spares[target.base_url] = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._open_spare(target, target.spare_path))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    def spare_taken(self, base_url: str) -> None:
        """A request to this model server is being sent: it takes the spare, if one is in the pool."""
        self._spares.pop(base_url, None)

    async def _open_spare(self, target: Upstream, path: str) -> None:
        try:
            async with await pooled.request(self.proxy, "GET", target.base_url + path, headers=dict(target.headers),
                                            timeout=aiohttp.ClientTimeout(total=SPARE_TIMEOUT_SECONDS)) as answer:
                await answer.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # stopped meanwhile, or busy: no spare
            log.debug(f"no spare connection to model {target.model!r}: {exc!r}")
            self._spares.pop(target.base_url, None)
