"""Inference routes (OpenAI's, llama-server's, uploads): the model named in the body decides where a request
goes (routing.py: the active profile's pins and selectors, a local model or a peer's, the model's filters)."""

from __future__ import annotations

import re

from aiohttp import web

from berth.core.errors import BadRequest
from berth.gateway import serving
from berth.gateway.access import ADMIN, INFERENCE, scope
from berth.gateway.context import GatewayContext, Routes, parse_json, require_body_type
from berth.gateway.loading import serve_while_loading
from berth.gateway.routing import forward, routed, with_media
from berth.scheduler import ModelState

# POST routes of llama-server (11434: server.cpp, every one its router mode sends on by the body's `model`;
# POST /props, which changes the server for everyone, is registered apart) and of OpenAI's API that
# llama-server does not serve itself.
INFERENCE_PATHS = (
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/completion",
    "/v1/responses", "/responses", "/v1/messages", "/infill", "/v1/embeddings", "/embeddings", "/embedding",
    "/v1/rerank", "/v1/reranking", "/rerank", "/reranking", "/tokenize", "/detokenize", "/apply-template",
    "/v1/chat/completions/input_tokens", "/chat/completions/input_tokens", "/v1/responses/input_tokens",
    "/responses/input_tokens", "/v1/messages/count_tokens", "/v1/chat/completions/control", "/v1/systemone",
    "/v1/audio/speech", "/v1/images/generations",
)
# Uploads: the model is a field of the multipart form (OpenAI's audio and image edit APIs).
FORM_PATHS = ("/v1/audio/transcriptions", "/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits")
# The dashboard's playground calls these under /ui/api/ (see dashboard.py); each is the OpenAI route beside it.
UI_PATHS = {"/ui/api/chat/completions": "/v1/chat/completions", "/ui/api/completions": "/v1/completions",
            "/ui/api/embeddings": "/v1/embeddings", "/ui/api/rerank": "/v1/rerank"}


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    routes = Inference(context)
    for path in INFERENCE_PATHS:
        router.add_post(path, routes.inference)
    for path in FORM_PATHS:
        router.add_post(path, routes.upload)
    for path in UI_PATHS:
        router.add_post(path, routes.playground)
    router.add_post("/props", routes.server_properties)


class Inference(Routes):
    @scope(INFERENCE)
    async def inference(self, request: web.Request) -> web.StreamResponse:
        return await self.by_body_model(request, request.path)

    @scope(ADMIN)
    async def server_properties(self, request: web.Request) -> web.StreamResponse:
        """POST /props: a model server's global properties (llama-server started with --props), which every
        client of that model shares; so, with keys, a key with `admin`, as for its slots and adapters."""
        return await self.by_body_model(request, request.path)

    @scope(INFERENCE)
    async def playground(self, request: web.Request) -> web.StreamResponse:
        return await self.by_body_model(request, UI_PATHS[request.path])

    async def by_body_model(self, request: web.Request, path: str) -> web.StreamResponse:
        context = self.context
        require_body_type(request)
        body = await context.read_body(request)
        payload = parse_json(body) if body else {}
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object with a `model` field")
        with routed(context, payload, body) as route:
            route = await with_media(context, request, route)
            if (route.peer is None and route.payload.get("stream") is True and path.endswith("/chat/completions")
                    and context.config.models[route.model].send_loading_state
                    and context.pool.state(route.model) is not ModelState.READY):
                return await serve_while_loading(context, request, route.model, path, route.body)
            return await forward(context, request, route, path)

    @scope(INFERENCE)
    async def upload(self, request: web.Request) -> web.StreamResponse:
        """An upload (multipart form) names its model in the `model` field; the body goes on as sent,
        with that field replaced when the model has `useModelName` or stands in as fallbackModel."""
        if request.content_type != "multipart/form-data":
            return await self.by_body_model(request, request.path)
        context = self.context
        body = await context.read_body(request)
        boundary = _boundary(request.headers.get("Content-Type", ""))
        field = form_field(body, boundary, "model") if boundary else None
        if field is None:
            model_id = context.default_or_named("the form has no `model` field")
        else:
            model_id, fallback = context.served_by(field[2].decode("utf-8", errors="replace"))
            rename = context.config.models[model_id].use_model_name or (model_id if fallback else "")
            if rename:
                body = body[:field[0]] + rename.encode() + body[field[1]:]
        return await serving.answer(context, request, model_id, request.path, body)


def _boundary(content_type: str) -> str:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    return match.group(1) if match else ""


def form_field(body: bytes, boundary: str, name: str) -> tuple[int, int, bytes] | None:
    """(start, end, value) of a text field of a multipart/form-data body (RFC 7578), or None."""
    delimiter = b"--" + boundary.encode()
    position = body.find(delimiter)
    while position != -1:
        headers_start = position + len(delimiter) + 2  # past the delimiter's CRLF
        headers_end = body.find(b"\r\n\r\n", headers_start)
        following = body.find(delimiter, headers_start)
        if headers_end == -1 or following == -1 or headers_end > following:
            return None
        headers = body[headers_start:headers_end].decode("latin-1").lower()
        if re.search(rf'content-disposition:\s*form-data;[^\r\n]*\bname="{re.escape(name)}"', headers):
            start, end = headers_end + 4, following - 2  # the value ends before the CRLF of the delimiter
            return start, end, body[start:end].strip()
        position = following
    return None
