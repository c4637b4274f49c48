"""What runs around every handler, outermost first: typed errors rendered in OpenAI's shape, the metrics
socket's limits, the Host check against DNS rebinding, and the API key."""

from __future__ import annotations

import base64
import hmac
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from berth.core.errors import (
    BerthError, BodyTooLarge, HostNotAllowed, RouteNotFound, StartBackedOff, TooManyRequests, Unauthorized,
)
from berth.core.hosts import LOCAL_NAMES, host_name, is_loopback
from berth.core.units import format_bytes
from berth.gateway.context import ErrorShape, GatewayContext, openai_shape

PROBE_PATHS = ("/metrics", "/health", "/ready")  # what the metrics socket answers
KEYLESS_PATHS = ("/health", "/ready")  # probes carry no key


def error_response(error: BerthError, shape: ErrorShape = openai_shape) -> web.Response:
    response = web.json_response(shape(error), status=error.status)
    if isinstance(error, (TooManyRequests, StartBackedOff)):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


class Middlewares:
    def __init__(self, context: GatewayContext) -> None:
        self.context = context

    def chain(self) -> list[Middleware]:
        return [self.errors, self.metrics_listener, self.host, self.auth]

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
        """The shape of the route's error answers: OpenAI's unless its family registered another."""
        resource = request.match_info.route.resource
        return self.context.error_shapes.get(resource.canonical, openai_shape) if resource else openai_shape

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
        """Against DNS rebinding: on a loopback listen address (or with allowedHosts set) only the Host
        names berth is known by get an answer."""
        allowed = self.context.config.allowed_hosts
        listen_host = self.context.listen_host
        if "*" not in allowed and (allowed or is_loopback(listen_host)):
            host = host_name(request.headers.get("Host", ""))
            if host and host not in LOCAL_NAMES and host != listen_host and host not in allowed:
                raise HostNotAllowed(host)
        return await handler(request)

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        keys = self.context.config.api_keys
        if keys and request.path not in KEYLESS_PATHS and not request.get("keyless"):
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


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None
