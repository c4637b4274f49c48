"""berth's HTTP surface: OpenAI routes, llama-swap and llama-server router admin routes."""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from importlib import resources

from aiohttp import web

from berth.config import PORT_MACRO, BerthConfig, Capabilities, PeerSpec
from berth.engine.redact import redact_argv
from berth.core.errors import (
    BadRequest, BerthError, BodyTooLarge, HostNotAllowed, ModelNotLoaded, RequestTimeout, RouteNotFound, StartBackedOff,
    TooManyRequests, Unauthorized, UnknownModel,
)
from berth.gateway.memory import MemoryService
from berth.gateway.metrics import Metrics
from berth.gateway.naming import Naming
from berth.gateway.pool import ModelPool
from berth.gateway.ledger import RequestLedger
from berth.gateway.proxy import Outbound, Proxy
from berth.gateway.upstream import Upstream
from berth.gateway.sessions import UpstreamSessions
from berth.memory.devices import inventory
from berth.runtime.logs import LogHub, LogLine
from berth.runtime.snapshot import ModelSnapshot
from berth.scheduler import ModelState

log = logging.getLogger("berth.gateway")

INFERENCE_PATHS = (
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/reranking", "/v1/responses",
    "/v1/messages", "/v1/messages/count_tokens", "/completion", "/completions", "/infill", "/embedding",
    "/embeddings", "/rerank", "/reranking", "/tokenize", "/detokenize", "/apply-template",
    "/v1/audio/speech", "/v1/images/generations",
)
# Uploads: the model is a field of the multipart form (OpenAI's audio and image edit APIs).
FORM_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits")
PROBE_PATHS = ("/metrics", "/health", "/ready")
LOADING_STATE_INTERVAL = 1.0  # seconds between progress deltas while a model loads (sendLoadingState)
# GET routes of a single llama-server; without ?model= they go to the default (or only) model, so
# clients written for one llama-server work unchanged.
SINGLE_SERVER_GETS = ("/props", "/slots", "/lora-adapters", "/v1/props")
_ROUTER_STATUS = {
    ModelState.STOPPED: "unloaded", ModelState.FAILED: "unloaded", ModelState.STARTING: "loading",
    ModelState.READY: "loaded", ModelState.STOPPING: "loaded",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: BerthError) -> web.Response:
    response = web.json_response(error.to_openai(), status=error.status)
    if isinstance(error, (TooManyRequests, StartBackedOff)):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    if scheme.lower() == "basic" and value:
        try:
            return base64.b64decode(value).decode().partition(":")[2]
        except ValueError:
            return None
    return request.headers.get("X-Api-Key")


class Gateway:
    def __init__(self, pool: ModelPool, memory: MemoryService, logs: LogHub, ledger: RequestLedger,
                 sessions: UpstreamSessions, listen_host: str = "127.0.0.1", metrics_port: int | None = None) -> None:
        self.pool = pool
        self.memory = memory
        self.logs = logs
        self.ledger = ledger
        self.metrics = ledger.metrics
        self.sessions = sessions
        self.proxy = Proxy(sessions, ledger, lambda: bool(self.config.api_keys))
        self.started_at = int(time.time())
        self.draining = False  # set at the first SIGTERM: /ready answers 503, new requests are refused
        self.naming = Naming()  # profiles and selectors
        self.listen_host = listen_host.strip("[]").lower()
        self.metrics_port = metrics_port  # `--metrics-listen`: a second socket that answers only PROBE_PATHS
        self.app = web.Application(middlewares=[self._errors, self._metrics_listener, self._host, self._auth],
                                   client_max_size=pool.config.max_body_bytes)
        self.app.cleanup_ctx.append(sessions.context)
        r = self.app.router
        r.add_get("/health", self.health)
        r.add_get("/ready", self.ready)
        r.add_get("/v1/models", self.openai_models)
        r.add_get("/running", self.running)
        r.add_route("*", "/unload", self.unload_all)
        r.add_get("/models", self.router_models)
        r.add_post("/models/load", self.router_load)
        r.add_post("/models/unload", self.router_unload)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/logs", self.logs_text)
        r.add_get("/logs/stream", self.logs_text_stream)
        r.add_get("/logs/stream/{source:.+}", self.logs_text_stream)
        r.add_route("*", "/upstream/{target:.+}", self.upstream)
        r.add_get("/api/profiles", self.profiles)
        r.add_put("/api/profiles/active", self.activate_profile)
        r.add_post("/api/models/unload", self.unload_models)  # llama-swap's (Open WebUI's eject button)
        r.add_post("/api/models/unload/{model:.+}", self.unload_models)
        # The dashboard, and the same admin calls under /ui/api/ so that a browser that logged in
        # with HTTP basic auth on /ui/ sends its credentials with every call it makes.
        r.add_get("/ui", self.ui_redirect)
        r.add_get("/ui/", self.ui_page)
        r.add_get("/ui/api/models", self.openai_models)
        r.add_get("/ui/api/running", self.running)
        r.add_get("/ui/api/requests", self.recent_requests)
        r.add_post("/ui/api/models/load", self.router_load)
        r.add_post("/ui/api/models/unload", self.router_unload)
        r.add_get("/ui/api/logs/stream/{model}", self.logs_stream)
        r.add_post("/ui/api/chat/completions", self.ui_chat)
        r.add_get("/api/requests", self.recent_requests)
        for path in INFERENCE_PATHS:
            r.add_post(path, self.inference)
        for path in FORM_PATHS:
            r.add_post(path, self.form_inference)
        r.add_route("*", "/{path:.*}", self.by_query_model)

    @property
    def config(self) -> BerthConfig:
        return self.pool.config

    # -- middlewares ------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BerthError as exc:
            return error_response(exc)
        except web.HTTPRequestEntityTooLarge:
            return error_response(BodyTooLarge(
                f"request body is larger than the limit of {self.config.max_body_bytes} bytes; "
                "send less or raise maxBodyBytes in the config"))

    @web.middleware
    async def _host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Against DNS rebinding: on a loopback listen address (or with allowedHosts set) only the Host
        names berth is known by get an answer."""
        allowed = self.config.allowed_hosts
        if "*" not in allowed and (allowed or _is_loopback(self.listen_host)):
            host = _host_name(request.headers.get("Host", ""))
            if host and host not in _LOCAL_NAMES and host != self.listen_host and host not in allowed:
                raise HostNotAllowed(host)
        return await handler(request)

    @web.middleware
    async def _metrics_listener(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """On the metrics socket only the probe paths answer, with no key: scrapers and load-aware
        routers (an endpoint picker) cannot send one. Who may reach that port is the network's to say."""
        if self.metrics_port is not None and _local_port(request) == self.metrics_port:
            if request.path not in PROBE_PATHS:
                raise RouteNotFound(request.path)
            request["keyless"] = True
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        keys = self.config.api_keys
        if keys and request.path not in ("/health", "/ready") and not request.get("keyless"):  # probes carry none
            presented = _presented_key(request)
            # compare against every key so the time taken does not reveal which one nearly matched
            matched = False
            for key in keys:
                matched |= presented is not None and hmac.compare_digest(presented.encode(), key.encode())
            if not matched:
                if request.path == "/ui" or request.path.startswith("/ui/"):
                    # a browser asks for credentials: any user name, the API key as password
                    return web.Response(status=401, text="berth: log in with any user name and an API key "
                                        "as the password", headers={"WWW-Authenticate": 'Basic realm="berth"'})
                raise Unauthorized("missing or invalid API key; send it as `Authorization: Bearer <key>`")
        return await handler(request)

    # -- inference ----------------------------------------------------------------------

    async def inference(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, request.path)

    async def ui_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "/v1/chat/completions")

    async def _inference(self, request: web.Request, path: str) -> web.StreamResponse:
        body = await self._read_body(request)
        payload = _parse_json(body) if body else {}
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object with a `model` field")
        requested = payload.get("model")
        if requested is not None and not isinstance(requested, str):
            raise BadRequest("`model` must be a string")
        if not requested:
            model_id = self.config.default_model()
            if model_id is None:
                raise BadRequest(f"request has no `model`; name one of: {', '.join(self.pool.listed_ids())}")
            return await self._serve_local(request, model_id, model_id, path, payload, body)
        with self.naming.chosen(self.config, requested, self._state_of) as name:
            if name != requested:  # a profile's pin or a selector's choice: the request names it from here
                payload["model"] = name
                body = json.dumps(payload).encode()
            if self.config.resolve(name) is None and (peer := self.config.resolve_peer(name)) is not None:
                return await self._serve_peer(request, *peer, path, payload)
            return await self._serve_local(request, self.pool.resolve(name), name, path, payload, body)

    def _state_of(self, name: str) -> ModelState | None:
        model_id = self.config.resolve(name)
        return self.pool.state(model_id) if model_id is not None else None

    async def _serve_local(self, request: web.Request, model_id: str, requested: str, path: str, payload: dict,
                           body: bytes) -> web.StreamResponse:
        body = self._apply_filters(model_id, requested, payload, body)
        if (payload.get("stream") is True and path.endswith("/chat/completions")
                and self.config.models[model_id].send_loading_state
                and self.pool.state(model_id) is not ModelState.READY):
            return await self._serve_while_loading(request, model_id, path, body)
        return await self._serve(request, model_id, path, body)

    async def _serve_peer(self, request: web.Request, peer: PeerSpec, model: str, path: str,
                          payload: dict) -> web.StreamResponse:
        """A peer's model: its filters, its model id in the body, its key in place of the client's."""
        apply_filters(payload, peer.strip_params, peer.set_params, model)
        headers = (("Authorization", f"Bearer {peer.api_key}"), ("x-api-key", peer.api_key)) if peer.api_key else ()
        target = Upstream(f"{peer.id}/{model}", peer.proxy, peer.timeouts, headers)
        record = self.ledger.begin(target.model, path)
        return await self.proxy.answer(request, Outbound(target, path, json.dumps(payload).encode()), record)

    async def _serve_while_loading(self, request: web.Request, model_id: str, path: str,
                                   body: bytes) -> web.StreamResponse:
        """llama-swap's sendLoadingState: answer a streamed chat at once, report the model's start in
        `reasoning_content` deltas (which chat UIs show as thinking) until it is ready, then stream the
        model's own answer in the same response."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        record = self.ledger.begin(model_id, path)
        began = record.began
        acquiring = asyncio.ensure_future(self.pool.acquire(model_id))
        lease = None
        try:
            note = f"berth: loading {model_id}"
            while True:
                await response.write(_loading_chunk(model_id, note))
                done, _ = await asyncio.wait({acquiring}, timeout=LOADING_STATE_INTERVAL)
                if done:
                    break
                note = f" … {time.perf_counter() - began:.0f}s"
            lease = acquiring.result()
        except BerthError as exc:
            self.ledger.refused(record, exc.status)
            await response.write(b"data: " + json.dumps(exc.to_openai()).encode() + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            if lease is None:  # the client left while it loaded
                if not acquiring.done():
                    acquiring.cancel()  # gives up its place in the queue
                elif not acquiring.cancelled() and acquiring.exception() is None:
                    acquiring.result().release()  # admitted in the same instant: give the slot back
        try:
            await response.write(_loading_chunk(model_id, f"\nberth: {model_id} is ready "
                                                           f"({time.perf_counter() - began:.1f}s)\n\n"))
            return await self.proxy.continue_stream(request, Outbound(lease.upstream(), path, body), record, response)
        finally:
            lease.release()

    async def form_inference(self, request: web.Request) -> web.StreamResponse:
        """An upload (multipart form) names its model in the `model` field; the body goes on as sent,
        with that field replaced when the model has `useModelName`."""
        if request.content_type != "multipart/form-data":
            return await self._inference(request, request.path)
        body = await self._read_body(request)
        boundary = _boundary(request.headers.get("Content-Type", ""))
        field = form_field(body, boundary, "model") if boundary else None
        if field is None:
            model_id = self.config.default_model()
            if model_id is None:
                raise BadRequest(f"the form has no `model` field; name one of: {', '.join(self.pool.listed_ids())}")
        else:
            model_id = self.pool.resolve(field[2].decode("utf-8", errors="replace"))
            rename = self.config.models[model_id].use_model_name
            if rename:
                body = body[:field[0]] + rename.encode() + body[field[1]:]
        return await self._serve(request, model_id, request.path, body)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, within clientBodyTimeout: a client that trickles it in holds nothing forever."""
        try:
            return await asyncio.wait_for(request.read(), self.config.client_body_timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within clientBodyTimeout "
                                 f"({self.config.client_body_timeout:g}s); send it faster or raise the limit") from None

    def _apply_filters(self, model_id: str, requested: str, payload: dict, body: bytes) -> bytes:
        """stripParams, then setParams, then the setParamsByID entry of the id the client asked for."""
        spec = self.config.models[model_id]
        by_id = dict(spec.set_params_by_id).get(requested, ())
        changed = apply_filters(payload, spec.strip_params, (*spec.set_params, *by_id), spec.use_model_name)
        return json.dumps(payload).encode() if changed else body

    async def _serve(self, request: web.Request, model_id: str, path: str, body: bytes | None,
                     rewrite_errors: bool = True) -> web.StreamResponse:
        record = self.ledger.begin(model_id, path)
        try:
            lease = await self.pool.acquire(model_id)
        except BerthError as exc:
            self.ledger.refused(record, exc.status)
            raise
        try:
            outbound = Outbound(lease.upstream(), path, body)
            if rewrite_errors:
                return await self.proxy.answer(request, outbound, record)
            return await self.proxy.pass_through(request, outbound, record)
        finally:
            lease.release()

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        """`/upstream/{model}[/{path}]`: the longest leading part of the path that names a model (ids may
        contain slashes) is the model; the rest, or `/`, is the path on its server."""
        parts = request.match_info["target"].split("/")
        for cut in range(len(parts), 0, -1):
            model_id = self.config.resolve("/".join(parts[:cut]))
            if model_id is not None:
                break
        else:
            raise UnknownModel(parts[0], self.pool.listed_ids())
        if cut == len(parts):
            # `/upstream/m` -> `/upstream/m/`, so the relative links of a model server's own page resolve
            # (as llama-swap does: 301 for GET and HEAD, 308 keeps any other method)
            target = request.path + "/" + (f"?{request.query_string}" if request.query_string else "")
            status = 301 if request.method in ("GET", "HEAD") else 308
            return web.Response(status=status, headers={"Location": target})
        path = "/" + "/".join(parts[cut:])
        ignored = any(p.search(path) for p in self.config.upstream_ignore_paths)  # unanchored, as Go's
        if ignored and self.pool.state(model_id) is not ModelState.READY:
            raise ModelNotLoaded(model_id, path)
        body = await self._read_body(request)
        # a raw pass-through to the model server (its own UI and API): answers go back as it sent them
        return await self._serve(request, model_id, path, body or None, rewrite_errors=False)

    async def by_query_model(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("model")
        if not name and request.method == "GET" and request.path in SINGLE_SERVER_GETS:
            name = self.config.default_model()
            if name is None:
                raise BadRequest(f"{request.path} needs ?model=<id> when several models are configured; "
                                 f"name one of: {', '.join(self.pool.listed_ids())}")
        if not name:
            raise RouteNotFound(request.path)
        body = await self._read_body(request)
        return await self._serve(request, self.pool.resolve(name), request.path, body or None)

    # -- lists and admin ----------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def ready(self, request: web.Request) -> web.Response:
        """For readiness probes: 200 once berth routes (its preloads have run), 503 from the first SIGTERM."""
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        if not self.pool.preloaded.is_set():
            return web.json_response({"status": "preloading", "models": list(self.config.preload)}, status=503)
        return web.json_response({"status": "ready"})

    def _model_entry(self, model_id: str, listed_as: str) -> dict:
        """One /v1/models record in llama-swap's shape (its metadata under meta.llamaswap, status,
        capabilities), with berth's `state`, `alias_of` and `memory` beside it."""
        spec = self.config.models[model_id]
        snapshot = self.pool.snapshot(model_id)
        state = snapshot.state
        entry: dict[str, Any] = {"id": listed_as, "object": "model", "created": self.started_at, "owned_by": "berth"}
        if spec.name:
            entry["name"] = spec.name.strip()
        if spec.description:
            entry["description"] = spec.description.strip()
        declared = capability_fields(spec.capabilities)
        entry.update(declared)
        port = snapshot.port if state is not ModelState.STOPPED else None
        listing = {k: v for k, v in bind_port(dict(spec.metadata), port).items()
                   if k not in declared}  # declared capabilities win over metadata of the same name
        if listed_as == model_id:
            listing["type"] = "model"
            if spec.aliases:
                listing["aliases"] = list(spec.aliases)
        else:
            listing.update(type="alias", modelID=model_id)
            entry["alias_of"] = model_id
        entry["meta"] = {"llamaswap": listing}
        if spec.capabilities.context:
            entry["meta"]["n_ctx"] = spec.capabilities.context
        entry["status"] = {"value": "loaded" if state is ModelState.READY else "unloaded"}
        entry["state"] = state.value
        entry["memory"] = _memory_entry(snapshot)
        return entry

    async def openai_models(self, request: web.Request) -> web.Response:
        data = []
        for spec in self.config.models.values():
            if spec.unlisted:
                continue
            data.append(self._model_entry(spec.id, spec.id))
            if self.config.include_aliases_in_list:
                data.extend(self._model_entry(spec.id, alias) for alias in spec.aliases)
        for peer in self.config.peers.values():
            data.extend({"id": f"{peer.id}/{model}", "object": "model", "created": self.started_at,
                         "owned_by": peer.id, "name": f"{peer.id}: {model}",
                         "meta": {"llamaswap": {"type": "peer", "peerID": peer.id}}, "status": {"value": "unloaded"},
                         "state": "remote"}
                        for model in peer.models)
        virtual = [(sel.id, sel.name, sel.description, {**dict(sel.metadata), "type": "selector",
                                                        "strategy": sel.strategy, "targets": list(sel.targets)})
                   for sel in self.config.selectors.values()]
        active = self.config.profiles.get(self.naming.active_profile(self.config) or "")
        if active is not None:  # the active profile's pins that are names of their own
            virtual += [(name, "", "", {"type": "pin", "profile": active.id, "target": target})
                        for name, target in active.pins
                        if target is not None and self.config.resolve(name) is None and name not in self.config.selectors]
        for virtual_id, name, description, listing in virtual:
            entry: dict[str, Any] = {"id": virtual_id, "object": "model", "created": self.started_at,
                                     "owned_by": "berth"}
            entry.update({k: v for k, v in (("name", name), ("description", description)) if v})
            entry.update(meta={"llamaswap": listing}, status={"value": "unloaded"}, state="virtual")
            data.append(entry)
        return web.json_response({"object": "list", "data": data})

    async def profiles(self, request: web.Request) -> web.Response:
        """llama-swap's profile list: the active one (or null) and each profile's pins."""
        return web.json_response({
            "active": self.naming.active_profile(self.config),
            "profiles": [{"id": p.id, "description": p.description, "pins": dict(p.pins)}
                         for p in sorted(self.config.profiles.values(), key=lambda p: p.id)]})

    async def activate_profile(self, request: web.Request) -> web.Response:
        """`{"name": "coding"}` makes that profile active; `{"name": null}` none."""
        payload = _parse_json(await self._read_body(request) or b"null")
        if not isinstance(payload, dict) or "name" not in payload:
            raise BadRequest('send {"name": "<profile>"} (or {"name": null} for none)')
        if payload["name"] is not None and not isinstance(payload["name"], str):
            raise BadRequest("the profile name must be a string or null")
        self.naming.activate(self.config, payload["name"])
        log.info("active profile: %s", payload["name"])
        return web.json_response({"active": self.naming.active_profile(self.config)})

    async def running(self, request: web.Request) -> web.Response:
        running = []
        for model_id, snapshot in self.pool.snapshots(gauges=True).items():
            if snapshot.state is ModelState.STOPPED or (snapshot.state is ModelState.FAILED
                                                         and snapshot.retry_in_s is None):
                continue
            files = snapshot.slots_on_disk
            running.append({
                "model": model_id, "state": snapshot.state.value, "proxy": snapshot.proxy, "port": snapshot.port,
                "ttl": self.config.models[model_id].ttl, "ttl_remaining_s": snapshot.ttl_remaining_s,
                "pid": snapshot.pid, "in_flight": snapshot.in_flight, "queued": snapshot.queued,
                "cmd": " ".join(snapshot.command), "start_failures": snapshot.start_failures,
                "retry_in_s": snapshot.retry_in_s,
                "kv_slots": None if files is None else {"directory": files.directory, "files": files.files,
                                                        "bytes": files.bytes},
                "memory": _memory_entry(snapshot),
            })
        return web.json_response({"running": running, "devices": await self._devices()})

    async def _devices(self) -> dict[str, dict[str, int]]:
        live = await asyncio.to_thread(inventory)
        return self.memory.devices(live, self.config, self.pool.active_models())

    async def recent_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.ledger.recent()})

    async def ui_redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    async def ui_page(self, request: web.Request) -> web.Response:
        page = resources.files("berth.ui").joinpath("index.html").read_bytes()
        return web.Response(body=page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def unload_models(self, request: web.Request) -> web.Response:
        name = request.match_info.get("model")
        outcome = await self.pool.unload(self.pool.resolve(name) if name else None)
        return web.json_response({"success": True, "unloaded": outcome})

    async def unload_all(self, request: web.Request) -> web.Response:
        await self.pool.unload(None, force=request.query.get("force") in ("1", "true"))
        return web.Response(text="OK")

    async def router_models(self, request: web.Request) -> web.Response:
        data = []
        for spec in self.config.models.values():
            if spec.unlisted:
                continue
            state = self.pool.state(spec.id)
            status: dict = {"value": _ROUTER_STATUS[state], "args": redact_argv(spec.argv)}
            if state is ModelState.FAILED:
                status["failed"] = True
            data.append({"id": spec.id, "object": "model", "owned_by": "berth", "created": self.started_at,
                         "aliases": list(spec.aliases), "status": status})
        return web.json_response({"object": "list", "data": data})

    async def _model_from_body(self, request: web.Request) -> str:
        payload = _parse_json(await self._read_body(request))
        name = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequest('body must name the model: {"model": "<id>"}')
        return self.pool.resolve(name)

    async def router_load(self, request: web.Request) -> web.Response:
        await self.pool.load(await self._model_from_body(request))
        return web.json_response({"success": True})

    async def router_unload(self, request: web.Request) -> web.Response:
        outcome = await self.pool.unload(await self._model_from_body(request))
        return web.json_response({"success": True, "unloaded": outcome})

    async def prometheus(self, request: web.Request) -> web.Response:
        snapshots = self.pool.snapshots(gauges=True)
        self.metrics.set_backoff({m: s.retry_in_s or 0.0 for m, s in snapshots.items()})
        planned = {m: (p.source, p.planned) for m, p in self.memory.plans.items() if p.planned}
        self.metrics.set_memory(planned, dict(self.memory.measured), await self._devices())
        self.metrics.set_load(snapshots)
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def logs_text(self, request: web.Request) -> web.Response:
        lines = self.logs.tail(request.query.get("model"))
        return web.Response(text="".join(f"[{line.source}] {line.text}\n" for line in lines))

    async def logs_text_stream(self, request: web.Request) -> web.StreamResponse:
        """llama-swap's `/logs/stream[/{proxy|upstream|model}]`: plain text lines as they are written, after
        the history unless `?no-history`. One model's stream is its server's output as printed."""
        name = request.match_info.get("source", "")
        model_id = None
        if name not in ("", "proxy", "upstream"):
            model_id = self.config.resolve(name)
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
        queue = self.logs.subscribe(model_id)
        try:
            if "no-history" not in request.query:
                history = b"".join(text(line) for line in self.logs.tail(model_id) if wanted(line))
                if history:
                    await response.write(history)
            while True:
                line = await queue.get()
                if wanted(line):
                    await response.write(text(line))
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        finally:
            self.logs.unsubscribe(queue)

    async def logs_stream(self, request: web.Request) -> web.StreamResponse:
        """The dashboard's log view: JSON lines (source and text) as server-sent events."""
        source = request.match_info.get("model")
        if source is not None and source != "berth":
            source = self.pool.resolve(source)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue = self.logs.subscribe(source)
        try:
            if "no-history" not in request.query:
                for line in self.logs.tail(source):
                    await response.write(_sse_line(line.source, line.text))
            while True:
                line = await queue.get()
                await response.write(_sse_line(line.source, line.text))
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        finally:
            self.logs.unsubscribe(queue)


_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON ({exc}); send a JSON object") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise BadRequest("request body nests too deeply to parse; send a JSON object of ordinary depth") from None


def _boundary(content_type: str) -> str:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    return match.group(1) if match else ""


def apply_filters(payload: dict, strip: tuple[str, ...], params: tuple[tuple[str, Any], ...], model: str) -> bool:
    """stripParams, then the parameters to set, then `model` (when given) into a request body, in place;
    whether anything changed. A local model's and a peer's filters mean the same."""
    changed = False
    for key in strip:
        if key in payload:
            del payload[key]
            changed = True
    for key, value in params:
        payload[key] = value
        changed = True
    if model:
        payload["model"] = model
        changed = True
    return changed


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


def capability_fields(caps: Capabilities) -> dict[str, Any]:
    """A model's declared capabilities as /v1/models fields (the names OpenRouter-style clients read)."""
    fields: dict[str, Any] = {}
    if caps.empty():
        return fields
    if caps.inputs or caps.outputs:
        architecture: dict[str, Any] = {}
        if caps.inputs:
            architecture["input_modalities"] = list(caps.inputs)
        if caps.outputs:
            architecture["output_modalities"] = list(caps.outputs)
        if caps.inputs and caps.outputs:
            architecture["modality"] = "+".join(caps.inputs) + "->" + "+".join(caps.outputs)
        fields["architecture"] = architecture
    can = {
        "vision": "image" in caps.inputs,
        "audio_transcriptions": "audio" in caps.inputs and "text" in caps.outputs,
        "audio_speech": "text" in caps.inputs and "audio" in caps.outputs,
        "image_generation": "text" in caps.inputs and "image" in caps.outputs,
        "image_to_image": "image" in caps.inputs and "image" in caps.outputs,
        "function_calling": caps.tools,
        "reranker": caps.reranker,
    }
    if any(can.values()):
        fields["capabilities"] = {name: True for name, present in can.items() if present}
    if caps.tools:
        fields["supported_parameters"] = ["tools", "tool_choice"]
    if caps.context:
        fields["context_length"] = caps.context
    return fields


def bind_port(value: Any, port: int | None) -> Any:
    """Metadata with `${PORT}` filled in for the model's current run: a value that is only `${PORT}`
    becomes the number (null while it is not running), and text mentions become its digits."""
    if value == PORT_MACRO:
        return port
    if isinstance(value, str) and port is not None:
        return value.replace(PORT_MACRO, str(port))
    if isinstance(value, dict):
        return {k: bind_port(v, port) for k, v in value.items()}
    if isinstance(value, list):
        return [bind_port(v, port) for v in value]
    return value


def _loading_chunk(model_id: str, text: str) -> bytes:
    chunk = {"id": "chatcmpl-berth-loading", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model_id, "choices": [{"index": 0, "delta": {"reasoning_content": text},
                                             "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None


def _memory_entry(snapshot: ModelSnapshot) -> dict[str, Any]:
    plan = snapshot.plan
    entry: dict[str, Any] = {"planned_bytes": plan.planned if plan else None,
                             "source": plan.source if plan else "unknown", "detail": plan.detail if plan else ""}
    if snapshot.measured is not None:
        entry["measured_bytes"] = dict(snapshot.measured)
    return entry


def _sse_line(source: str, text: str) -> bytes:
    return f"data: {json.dumps({'source': source, 'text': text})}\n\n".encode()
