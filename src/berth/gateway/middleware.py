"""What runs around every handler, outermost first: typed errors rendered in OpenAI's shape, the metrics
socket's limits, the Host check against DNS rebinding, other web pages (CORS), and the API key with its scopes.
Besides, every answer's CORS headers are berth's own (`cors_headers`, run as the answer's headers go out)."""

from __future__ import annotations

import base64
import ipaddress

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from berth.core.errors import (
    BerthError, BodyTooLarge, HostNotAllowed, KeyLimitReached, MethodNotAllowed, OriginNotAllowed, RouteNotFound,
    StartBackedOff, TooManyRequests, Unauthorized, UnknownModel,
)
from berth.core.hosts import LOCAL_NAMES, host_name, is_loopback
from berth.core.units import format_bytes
from berth.gateway import origins
from berth.gateway.access import ANY_KEY, KEYLESS, may_use_model, remember_key, route_scope
from berth.gateway.context import ErrorShape, GatewayContext, openai_shape

PROBE_PATHS = ("/metrics", "/health", "/v1/health", "/ready")  # what the metrics socket answers
_CORS = "cors"  # the request's key for the CORS headers its answer carries


def error_response(error: BerthError, shape: ErrorShape = openai_shape) -> web.Response:
    response = web.json_response(shape(error), status=error.status)
    if isinstance(error, (TooManyRequests, StartBackedOff, KeyLimitReached)):
        response.headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, MethodNotAllowed):
        response.headers["Allow"] = ", ".join(error.allowed)
    return response


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """As an answer's headers go out: whatever Access-Control-* a model server (or anything else) put there
    goes, and berth's own for a listed origin come in."""
    for name in [n for n in response.headers if n.lower().startswith("access-control-")]:
        del response.headers[name]
    response.headers.update(request.get(_CORS, {}))


class Middlewares:
    def __init__(self, context: GatewayContext) -> None:
        self.context = context

    def chain(self) -> list[Middleware]:
        return [self.errors, self.metrics_listener, self.host, self.other_pages, self.auth]

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BerthError as exc:
            return error_response(exc, self._shape(request))
        except web.HTTPRequestEntityTooLarge:
            limit = self.context.config.max_body_bytes
            return error_response(BodyTooLarge(
                f"request body is larger than maxBodyBytes ({format_bytes(limit)}, {limit} bytes); images sent "
                "inline as base64 count at 4/3 of their file size: send smaller images, or their http(s) URLs "
                "(berth fetches those), or raise maxBodyBytes in the config"), self._shape(request))

    def _shape(self, request: web.Request) -> ErrorShape:
        """The shape of the route's error answers: OpenAI's unless its family registered another (for its route,
        or for the path when another route answers it: `GET /api/chat` is a 405 in Ollama's shape)."""
        shapes, resource = self.context.error_shapes, request.match_info.route.resource
        return shapes.get(resource.canonical if resource else request.path) or shapes.get(request.path, openai_shape)

    @web.middleware
    async def metrics_listener(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """On the metrics socket only the probe paths answer, with no key: scrapers and load-aware
        routers (an endpoint picker) cannot send one. Who may reach that port is the network's to say."""
        port = self.context.metrics_port
        if port is not None and _local_port(request) == port:
            if request.path not in PROBE_PATHS:
                raise RouteNotFound(request.path)
            request["keyless"] = True
        return await handler(request)

    @web.middleware
    async def host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Against DNS rebinding (a page on a name of its own that resolves to this machine): only the Host
        names berth is known by get an answer, whenever berth asks for no key (no apiKeys, or the metrics
        socket), on a loopback listen address, and wherever allowedHosts names hosts ("*": never)."""
        allowed = self.context.config.allowed_hosts
        listen_host = self.context.listen_host
        keyless = not self.context.config.api_keys or request.get("keyless", False)
        if "*" not in allowed and (allowed or keyless or is_loopback(listen_host)):
            host = host_name(request.headers.get("Host", ""))
            if host and not self._known_as(host):
                raise HostNotAllowed(host)
        return await handler(request)

    def _known_as(self, host: str) -> bool:
        listen_host = self.context.listen_host
        if host in LOCAL_NAMES or host == listen_host or host in self.context.config.allowed_hosts:
            return True
        # reached over the network by address: no name, so nothing to rebind
        return not is_loopback(listen_host) and _is_address(host)

    @web.middleware
    async def other_pages(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Requests a browser sends for a page of another origin run only when allowedOrigins lists it; their
        answers then allow that origin (see origins.py). A listed origin's preflight is answered here, before
        the key is asked for: browsers send none with it."""
        page = origins.foreign_page(request.headers, request.method)
        if page is None:
            return await handler(request)
        if not page or not origins.allowed(page, self.context.config.allowed_origins):
            raise OriginNotAllowed(page)
        if origins.is_preflight(request.method, request.headers):
            request[_CORS] = origins.preflight_headers(page, request.headers.get("Access-Control-Request-Headers", ""))
            return web.Response(status=204)
        request[_CORS] = origins.answer_headers(page)
        return await handler(request)

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With apiKeys: a known key (compared in constant time, see access.KeyRing), whose scopes cover the
        route's (each handler declares its own, access.scope)."""
        needed = route_scope(request)
        if not self.context.config.api_keys or needed == KEYLESS or request.get("keyless"):
            return await handler(request)
        key = self.context.keyring().match(_presented_key(request))
        if key is None:
            if request.path == "/ui" or request.path.startswith("/ui/"):
                # a browser asks for credentials: any user name, the API key as password
                return web.Response(status=401, text="berth: log in with any user name and an API key "
                                    "as the password", headers={"WWW-Authenticate": 'Basic realm="berth"'})
            raise Unauthorized("missing or invalid API key; send it as `Authorization: Bearer <key>`")
        remember_key(request, key)
        if needed is not None and needed != ANY_KEY:
            self.context.require(request, needed)
        try:
            return await handler(request)
        except UnknownModel as exc:  # name only the models this key may use
            config = self.context.config
            raise UnknownModel(exc.model, [m for m in exc.available if may_use_model(config, key, m)]) from None


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


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None
