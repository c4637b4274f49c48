"""Ollama's API (`/api/*`) on berth's models: each request is translated (requests.py), routed and served
like any other (routing.py: profiles, selectors, peers, filters; a lease, the ledger, the metrics), and the
model server's answer translated back as it streams (answers.py). Errors answer in Ollama's shape,
`{"error": "..."}`, with the status berth's typed error carries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from berth.config import ModelSpec
from berth.core.errors import BadRequest, BerthError
from berth.gateway import serving
from berth.gateway.access import ADMIN, ANY_KEY, INFERENCE, may_use, may_use_model, request_key, scope
from berth.gateway.context import GatewayContext, Routes, parse_json, require_body_type
from berth.gateway.ollama import requests
from berth.gateway.ollama.answers import Embeddings, Generation, created_at
from berth.gateway.ollama.models import ModelFile, PropsAnswer, listing, no_file_show, running, show
from berth.gateway.ollama.names import local_name
from berth.gateway.ollama.pulls import answer_nothing_to_pull, delete, pull_target, stream_pull
from berth.gateway.proxy import Outbound, Reframe
from berth.gateway.routing import Route, forward, routed, with_media
from berth.scheduler import ModelState
from berth.store import ModelStore

log = logging.getLogger("berth.gateway")

API_VERSION = "0.32.15"  # the Ollama release whose API this follows (clients gate features by it)


def ollama_shape(error: BerthError) -> dict[str, Any]:
    return {"error": error.message}


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    routes = OllamaRoutes(context)
    for method, path, handler in (
            ("GET", "/api/version", routes.version), ("GET", "/api/tags", routes.tags), ("GET", "/api/ps", routes.ps),
            ("POST", "/api/show", routes.show), ("POST", "/api/chat", routes.chat),
            ("POST", "/api/generate", routes.generate), ("POST", "/api/embed", routes.embed),
            ("POST", "/api/embeddings", routes.embeddings), ("POST", "/api/pull", routes.pull),
            ("DELETE", "/api/delete", routes.delete)):
        router.add_route(method, path, handler)
        context.error_shapes[path] = ollama_shape


class OllamaRoutes(Routes):
    def __init__(self, context: GatewayContext) -> None:
        super().__init__(context)
        self._num_ctx_noted: set[tuple[str, int]] = set()

    # -- models ------------------------------------------------------------------------

    @scope(ANY_KEY)
    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": API_VERSION})

    @scope(INFERENCE)
    async def tags(self, request: web.Request) -> web.Response:
        """The config's listed models (aliases too with includeAliasesInList) and peers' models, those the
        request's key may use."""
        config, started = self.context.config, self.context.started_at
        key = request_key(request)

        def entries() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            for spec in config.models.values():
                if spec.unlisted or not may_use_model(config, key, spec.id):
                    continue
                file = self._file(spec)
                names = [spec.id, *(spec.aliases if config.include_aliases_in_list else ())]
                found.extend(listing(name, file, started) for name in names)
            found.extend(listing(f"{peer.id}/{model}", None, started)
                         for peer in config.peers.values() for model in peer.models
                         if may_use(key, (f"{peer.id}/{model}",)))
            return found

        return web.json_response({"models": await asyncio.to_thread(entries)})  # reads GGUF headers

    @scope(INFERENCE)
    async def ps(self, request: web.Request) -> web.Response:
        """Loaded models the request's key may use, the one that stays longest first (as Ollama sorts them)."""
        config, key = self.context.config, request_key(request)
        ready = [s for s in self.context.pool.snapshots().values()
                 if s.state is ModelState.READY and may_use_model(config, key, s.model)]
        files = await asyncio.to_thread(lambda: [self._file(self.context.config.models[s.model]) for s in ready])
        models = [running(s.model, file, s) for s, file in zip(ready, files)]
        models.sort(key=lambda m: m["expires_at"], reverse=True)
        return web.json_response({"models": models})

    @scope(INFERENCE)
    async def show(self, request: web.Request) -> web.StreamResponse:
        """A running model's own /props (template, sampling defaults, context, vision) with its GGUF's
        metadata; for a model that is not running, what the GGUF and its cmd's flags say (nothing starts)."""
        context = self.context
        name = requests.model_name(await self._request(request))
        with routed(context, {"model": local_name(context.config, name)}, None) as route:
            context.require_model(request, route.model)
            file = None if route.peer else await asyncio.to_thread(self._file, context.config.models[route.model])
            if file is None:  # a peer's model, or another engine's
                return web.json_response(no_file_show(context.started_at))
            if context.pool.state(route.model) is not ModelState.READY:
                return web.json_response(show(file, None))
            async with serving.leased(context, request, route.model, "/props", uses_slot=False) as (lease, record):
                return await context.proxy.answer(request, Outbound(lease.upstream(), "/props", None, method="GET"),
                                                  record, PropsAnswer(file))

    # -- inference ---------------------------------------------------------------------

    @scope(INFERENCE)
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        translated = requests.chat(body)  # checks every field, also of a request that only loads
        if not body.get("messages"):
            return await self._load_or_unload(request, body, chat=True)
        return await self._forward(request, body, translated,
                                   lambda model: Generation(model, translated.stream, chat=True))

    @scope(INFERENCE)
    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        translated = requests.generate(body)
        if not body.get("prompt") and not body.get("images"):
            return await self._load_or_unload(request, body, chat=False)
        return await self._forward(request, body, translated,
                                   lambda model: Generation(model, translated.stream, chat=False))

    @scope(INFERENCE)
    async def embed(self, request: web.Request) -> web.StreamResponse:
        return await self._embed(request, legacy=False)

    @scope(INFERENCE)
    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._embed(request, legacy=True)

    async def _embed(self, request: web.Request, legacy: bool) -> web.StreamResponse:
        body = await self._request(request)
        requests.model_name(body)  # no model: refused before anything else
        inputs = requests.embed_inputs(body, legacy)
        dimensions = None if legacy else requests.dimensions(body)
        if not inputs:  # as Ollama: nothing to embed loads the model and answers no vectors
            model, _ = await self._load_or_unload_model(request, body)
            return web.json_response({"embedding": []} if legacy else {"model": model, "embeddings": []})
        return await self._forward(request, body, requests.embed(body, inputs, legacy),
                                   lambda model: Embeddings(model, legacy, dimensions))

    async def _forward(self, request: web.Request, body: dict[str, Any], translated: requests.Translated,
                       reframe: Callable[[str], Reframe]) -> web.StreamResponse:
        """Route the translated request by its model as /v1 requests are routed, set the model's keep_alive,
        and serve it through a lease; the answer comes back through `reframe(the model it names)`."""
        context = self.context
        keep_alive = requests.keep_alive_seconds(body.get("keep_alive"))
        payload = translated.body
        payload["model"] = local_name(context.config, payload["model"])
        with routed(context, payload, None) as route:
            route = await with_media(context, request, route)
            if route.peer is None and translated.num_ctx is not None:
                await self._note_num_ctx(route.model, translated.num_ctx)
            return await forward(context, request, route, translated.path, reframe(_answered_as(route, body)),
                                 keep_alive)

    async def _load_or_unload(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.Response:
        """A request with nothing to answer: with keep_alive 0 the model is unloaded, else loaded (and kept
        for its keep_alive). One object, as Ollama answers, streamed or not."""
        model, reason = await self._load_or_unload_model(request, body)
        answer: dict[str, Any] = {"model": model, "created_at": created_at()}
        answer.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        answer.update(done=True, done_reason=reason)
        return web.json_response(answer)

    async def _load_or_unload_model(self, request: web.Request, body: dict[str, Any]) -> tuple[str, str]:
        """Unload the request's model (keep_alive 0) or load it; (the model the answer names, "unload" or
        "load"). With keys, a key loads only its models, and unloading (which stops everyone's requests to the
        model) needs `admin`, as /models/unload."""
        context = self.context
        keep_alive = requests.keep_alive_seconds(body.get("keep_alive"))
        with routed(context, {"model": local_name(context.config, requests.model_name(body))}, None) as route:
            context.require_model(request, route.model)
            local = _local(route)
            if keep_alive == 0:
                context.require(request, ADMIN)
                await context.pool.unload(local)
                return _answered_as(route, body), "unload"
            await context.pool.load(local)
            if keep_alive is not None:  # counted from now, when the load's own request has ended
                context.pool.keep_alive(local, keep_alive)
            return _answered_as(route, body), "load"

    async def _note_num_ctx(self, model_id: str, num_ctx: int) -> None:
        """A request's num_ctx does not restart a model (its context is its cmd's): say so once per value."""
        if (model_id, num_ctx) in self._num_ctx_noted:
            return
        self._num_ctx_noted.add((model_id, num_ctx))
        file = await asyncio.to_thread(self._file, self.context.config.models[model_id])
        if file is not None and file.context != num_ctx:
            log.warning(f"{model_id}: a client asks for num_ctx {num_ctx}; the model runs with {file.context} tokens "
                        "per slot (its cmd's -c and --parallel), which berth keeps: set -c in the config to change it")

    # -- the store ---------------------------------------------------------------------

    @scope(ADMIN)
    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        target, stream = pull_target(self.context, requests.model_name(body)), requests.streams(body)
        if isinstance(target, str):
            return await answer_nothing_to_pull(request, target, stream)
        return await stream_pull(self.context, request, target, stream)

    @scope(ADMIN)
    async def delete(self, request: web.Request) -> web.Response:
        return await delete(self.context, requests.model_name(await self._request(request)))

    # -- parts -------------------------------------------------------------------------

    async def _request(self, request: web.Request) -> dict[str, Any]:
        require_body_type(request)
        raw = await self.context.read_body(request)
        if not raw.strip():
            raise BadRequest("missing request body: send a JSON object such as {\"model\": \"<name>\"}")
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def _file(self, spec: ModelSpec) -> ModelFile | None:
        store = ModelStore.at(self.context.config.store_dir)
        return ModelFile.read(self.context.memory.planner.launch_args(spec), store.recorded_sha256)


def _answered_as(route: Route, body: dict[str, Any]) -> str:
    """The model an answer names: the client's name, or fallbackModel's id when that model stands in for a
    name berth does not know (as /v1 answers show it)."""
    return route.model if route.fallback else requests.model_name(body)


def _local(route: Route) -> str:
    if route.peer is not None:
        raise BadRequest(f"{route.model} is a peer's model: berth does not load or unload it; ask that server")
    return route.model
