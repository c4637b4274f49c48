"""Errors aiohttp answers before any handler runs (a bad request line, headers too large, a bad
Content-Length) or when a handler fails unexpectedly: in OpenAI's error shape, like berth's own.

aiohttp writes these itself, as plain text, from `RequestHandler.handle_error`; the runner below hands
out request handlers that answer them as JSON instead. This is the one place that depends on how
aiohttp builds its server.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest


class _OpenAIErrorHandler(RequestHandler):
    __slots__ = ()  # the same layout as aiohttp's, so a handler can take this class

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


class _OpenAIErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _OpenAIErrorHandler
        return handler


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections answer protocol errors in OpenAI's shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _OpenAIErrorServer
        return server
