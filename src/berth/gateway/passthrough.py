"""Routes that name their model outside the body: `/upstream/{model}/{path}` (a model server's own UI and
API, passed through raw), and every other path with `?model=` (llama-server's routes whose request names no
model go to the default model without one). Registered last: its catch-all answers what no other route does."""

from __future__ import annotations

import re

from aiohttp import web

from berth.core.errors import MethodNotAllowed, ModelNotLoaded, RouteNotFound, UnknownModel
from berth.gateway import serving
from berth.gateway.access import ADMIN, ANY_KEY, INFERENCE, scope
from berth.gateway.context import FORM, JSON, GatewayContext, Routes, require_body_type
from berth.gateway.media import checked_body
from berth.scheduler import ModelState

# Routes of a single llama-server whose request names no model (its GETs, a JSON array, a stream's id):
# without ?model= they go to the default (or only) model, so clients written for one llama-server work
# unchanged.
SINGLE_SERVER_ROUTES = (
    ("GET", re.compile(r"/v1/props|/props|/slots|/lora-adapters|/v1/stream")),
    ("POST", re.compile(r"/lora-adapters|/slots/\d+|/v1/streams/lookup")),
    ("DELETE", re.compile(r"/v1/stream")),
)
_READS = ("GET", "HEAD", "OPTIONS")  # methods that change nothing; any other goes with a JSON or form body
PROPERTIES = ("/props", "/v1/props")  # read-only, so the inference scope has them; /slots shows others' work


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    routes = PassThrough(context)
    router.add_route("*", "/upstream/{target:.+}", routes.upstream)
    for path in PROPERTIES:
        router.add_get(path, routes.server_properties)
    router.add_route("*", "/{path:.*}", routes.by_query_model)  # the catch-all: keep it the last route


class PassThrough(Routes):
    @scope(ADMIN)
    async def upstream(self, request: web.Request) -> web.StreamResponse:
        """`/upstream/{model}[/{path}]`: the longest leading part of the path that names a model (ids may
        contain slashes) is the model; the rest, or `/`, is the path on its server."""
        context = self.context
        parts = request.match_info["target"].split("/")
        for cut in range(len(parts), 0, -1):
            model_id = context.config.resolve("/".join(parts[:cut]))
            if model_id is not None:
                break
        else:
            raise UnknownModel(parts[0], context.pool.listed_ids())
        if cut == len(parts):
            # `/upstream/m` -> `/upstream/m/`, so the relative links of a model server's own page resolve
            # (as llama-swap does: 301 for GET and HEAD, 308 keeps any other method)
            target = request.path + "/" + (f"?{request.query_string}" if request.query_string else "")
            status = 301 if request.method in ("GET", "HEAD") else 308
            return web.Response(status=status, headers={"Location": target})
        path = "/" + "/".join(parts[cut:])
        ignored = any(p.search(path) for p in context.config.upstream_ignore_paths)  # unanchored, as Go's
        if ignored and context.pool.state(model_id) is not ModelState.READY:
            raise ModelNotLoaded(model_id, path)
        if request.method not in _READS:
            require_body_type(request, JSON, FORM)
        body = await checked_body(context, model_id, await context.read_body(request))
        # a raw pass-through to the model server (its own UI and API): answers go back as it sent them
        return await serving.pass_through(context, request, model_id, path, body or None)

    @scope(INFERENCE)
    async def server_properties(self, request: web.Request) -> web.StreamResponse:
        """A model server's /props (context size, chat template), which clients of one llama-server read."""
        return await self._by_query(request, None)

    @scope(ANY_KEY)
    async def by_query_model(self, request: web.Request) -> web.StreamResponse:
        """Any other path: a 404 when nothing names a model; sent to a model server's own API (its slots,
        adapters, ...: everyone's) only for a key with `admin`."""
        return await self._by_query(request, ADMIN)

    async def _by_query(self, request: web.Request, needs: str | None) -> web.StreamResponse:
        context = self.context
        single_server = any(request.method == method and path.fullmatch(request.path)
                            for method, path in SINGLE_SERVER_ROUTES)
        # a route of berth's own, asked with another method (GET /unload: an <img>); GET /props is
        # llama-server's own beside berth's POST /props
        elsewhere = [] if single_server else await _methods_elsewhere(request)
        if elsewhere:
            raise MethodNotAllowed(request.method, request.path, elsewhere)
        name = request.query.get("model")
        if not name and single_server:
            name = context.default_or_named(f"{request.path} needs ?model=<id> when several models are configured")
        if not name:
            raise RouteNotFound(request.path)
        if needs is not None:
            context.require(request, needs)
        if request.method not in _READS:
            require_body_type(request, JSON, FORM)
        model_id = context.served_by(name)[0]
        body = await checked_body(context, model_id, await context.read_body(request))
        return await serving.answer(context, request, model_id, request.path, body or None,
                                    uses_slot=False)  # a model server's own routes: properties, slots, adapters


async def _methods_elsewhere(request: web.Request) -> list[str]:
    """The methods other routes take at this request's path (none when no other route has the path)."""
    methods: set[str] = set()
    for resource in request.app.router.resources():
        match, allowed = await resource.resolve(request)
        if match is None:  # its path and not its method; or not its path at all (no methods)
            methods |= allowed
    return sorted(methods)
