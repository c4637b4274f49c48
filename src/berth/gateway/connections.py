"""How berth's HTTP server treats client connections, before and around its handlers.

- Errors aiohttp answers before any handler runs (a bad request line, headers too large, a bad
  Content-Length) or when a handler fails unexpectedly come in OpenAI's error shape, like berth's own
  (aiohttp writes them as plain text from `RequestHandler.handle_error`).
- At most `maxConnections` client connections are open at once; one more is closed at once.
- A connection must deliver a request's headers within `clientHeaderTimeout` seconds of opening or of
  its last answer (aiohttp's keep-alive timer, which it arms from the start of a connection), so slow
  clients cannot hold connections open.

This is the one place that depends on how aiohttp builds its server.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest


class _BerthRequestHandler(RequestHandler):
    __slots__ = ()  # the same layout as aiohttp's, so a handler can take this class

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        if isinstance(server, _BerthServer) and len(server.connections) > server.max_connections:
            transport.close()  # over the cap: refused before reading anything

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs as aiohttp does; raises if too late
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        if status >= 500:
            text, kind, code = "berth hit an unexpected error handling this request", "server_error", "internal_error"
        else:
            text = f"the request could not be read as HTTP ({message or phrase}); check what the client sends"
            kind, code = "invalid_request_error", "bad_http_request"
        response = web.json_response({"error": {"message": f"{status} {phrase}: {text}", "type": kind,
                                                "code": code}}, status=status)
        response.force_close()  # the connection's state is unknown after a protocol error
        return response


class _BerthServer(web.Server):
    max_connections = 1024

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _BerthRequestHandler
        return handler


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections behave as described above."""

    def __init__(self, app: web.Application, max_connections: int, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=header_timeout, **kwargs)
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _BerthServer
        cast(_BerthServer, server).max_connections = self._max_connections
        return server
