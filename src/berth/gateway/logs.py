"""Logs over HTTP: llama-swap's plain-text `/logs` and `/logs/stream[/{source}]`, and the dashboard's
server-sent events."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from berth.core.errors import BadRequest
from berth.gateway.access import LOGS, scope
from berth.gateway.context import GatewayContext, Routes
from berth.runtime.logs import LogLine


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    routes = Logs(context)
    router.add_get("/logs", routes.text)
    router.add_get("/logs/stream", routes.text_stream)
    router.add_get("/logs/stream/{source:.+}", routes.text_stream)
    router.add_get("/ui/api/logs/stream/{model}", routes.events)


class Logs(Routes):
    @scope(LOGS)
    async def text(self, request: web.Request) -> web.Response:
        lines = self.context.logs.tail(request.query.get("model"))
        return web.Response(text="".join(f"[{line.source}] {line.text}\n" for line in lines))

    @scope(LOGS)
    async def text_stream(self, request: web.Request) -> web.StreamResponse:
        """llama-swap's `/logs/stream[/{proxy|upstream|model}]`: plain text lines as they are written, after
        the history unless `?no-history`. One model's stream is its server's output as printed."""
        name = request.match_info.get("source", "")
        model_id = None
        if name not in ("", "proxy", "upstream"):
            model_id = self.context.config.resolve(name)
            if model_id is None:
                raise BadRequest(f"no log named {name!r}; use proxy, upstream or a model id")

        def wanted(line: LogLine) -> bool:
            if name == "proxy":
                return not line.upstream
            if name == "upstream":
                return line.upstream
            return model_id is None or line.source == model_id

        def text(line: LogLine) -> bytes:
            return (f"{line.text}\n" if model_id else f"[{line.source}] {line.text}\n").encode()

        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                               "X-Content-Type-Options": "nosniff", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        hub = self.context.logs
        queue = hub.subscribe(model_id)
        try:
            if "no-history" not in request.query:
                history = b"".join(text(line) for line in hub.tail(model_id) if wanted(line))
                if history:
                    await response.write(history)
            while True:
                line = await queue.get()
                if wanted(line):
                    await response.write(text(line))
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        finally:
            hub.unsubscribe(queue)

    @scope(LOGS)
    async def events(self, request: web.Request) -> web.StreamResponse:
        """The dashboard's log view: JSON lines (source and text) as server-sent events."""
        source = request.match_info.get("model")
        if source is not None and source != "berth":
            source = self.context.pool.resolve(source)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        hub = self.context.logs
        queue = hub.subscribe(source)
        try:
            if "no-history" not in request.query:
                for line in hub.tail(source):
                    await response.write(_sse_line(line.source, line.text))
            while True:
                line = await queue.get()
                await response.write(_sse_line(line.source, line.text))
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        finally:
            hub.unsubscribe(queue)


def _sse_line(source: str, text: str) -> bytes:
    return f"data: {json.dumps({'source': source, 'text': text})}\n\n".encode()
