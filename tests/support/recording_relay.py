"""A relay between berth and a real model server that keeps what the server answered, byte for byte.

Configured as a model's `proxy`, it lets a test compare what berth made of an answer with what the model
server itself sent for that very request (its `timings`, its `usage`). Runs in a thread of the test process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tests.support.threaded_server import ThreadedServer


@dataclass
class Exchange:
    path: str
    request: dict | None  # the JSON body berth sent
    answer: bytes  # what the model server sent back

    def events(self) -> list[dict]:
        """The JSON objects of the answer: its server-sent events, or the one body."""
        if not self.answer.lstrip().startswith(b"data:"):
            return [json.loads(self.answer)]
        found = []
        for line in self.answer.splitlines():
            if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                found.append(json.loads(line[6:]))
        return found

    def timings(self) -> dict:
        [timings] = [event["timings"] for event in self.events() if "timings" in event]
        return timings


class RecordingRelay:
    def __init__(self, target: str) -> None:
        self.target = target  # the model server's base URL
        self.exchanges: list[Exchange] = []
        self.url = ""
        self._server = ThreadedServer()

    def answers_to(self, path: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.path == path]

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.request(request.method, self.target + request.path_qs, data=body or None,
                                       headers=headers) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items()
                    if k.lower() in ("content-type", "content-encoding")})
                await response.prepare(request)
                answer = b""
                async for chunk in upstream.content.iter_any():
                    answer += chunk
                    await response.write(chunk)
                if request.path != "/health":  # kept before the end goes out: a test that has the answer has it
                    self.exchanges.append(Exchange(request.path, json.loads(body) if body else None, answer))
                await response.write_eof()
        return response

    def start(self) -> RecordingRelay:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._relay)
        self._server.serve(app)
        self.url = self._server.url
        return self

    def stop(self) -> None:
        self._server.stop()
