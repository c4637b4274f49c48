"""berth's HTTP surface put together: the middlewares, then each route family, which registers its own routes.

A new route family is a module with `register(router, context)` and one line in ROUTE_FAMILIES. Where each
behaviour lives:

    middleware     errors in OpenAI's shape, the metrics socket, Host check, other web pages (CORS), API keys
    observability  /health, /ready, /running, /metrics, /api/events (each model's starts and stops, why)
    activity       /api/requests (in flight and recent), one request's captured bodies, cancel
    listings       /v1/models, /models
    admin          load and unload, profiles
    logs           /logs, /logs/stream, the dashboard's log events
    dashboard      /ui
    usage          /api/usage (usage per API key), /ui/api/whoami (what the dashboard's key may do)
    inference      OpenAI and llama-server inference routes by the body's model, uploads
                   (routing: model names to routes; serving: lease + proxy + ledger; loading: sendLoadingState)
    ollama         Ollama's /api/* translated onto the same routing and serving, answers translated back
    passthrough    /upstream/{model}/..., any path with ?model=, and the catch-all (last)

Handlers see models through the pool's snapshots; requests are counted by the ledger (ledger.py) and
forwarded by the proxy (proxy.py). Each handler declares the scope an API key needs for it (access.py).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from berth.gateway import (
    activity, admin, dashboard, inference, listings, logs, observability, ollama, passthrough, usage,
)
from berth.gateway.accounts import KeyAccounts
from berth.gateway.context import GatewayContext
from berth.gateway.ledger import RequestLedger
from berth.gateway.memory import MemoryService
from berth.gateway.middleware import Middlewares, cors_headers
from berth.gateway.pool import ModelPool
from berth.gateway.proxy import Proxy
from berth.gateway.sessions import UpstreamSessions
from berth.runtime.logs import LogHub

RouteFamily = Callable[[web.UrlDispatcher, GatewayContext], None]

ROUTE_FAMILIES: tuple[RouteFamily, ...] = (
    observability.register,
    activity.register,
    listings.register,
    admin.register,
    logs.register,
    dashboard.register,
    usage.register,
    inference.register,
    ollama.register,
    passthrough.register,  # its catch-all answers any path: it stays last
)


class Gateway:
    def __init__(self, pool: ModelPool, memory: MemoryService, logs: LogHub, ledger: RequestLedger,
                 accounts: KeyAccounts, sessions: UpstreamSessions, listen_host: str = "127.0.0.1",
                 metrics_port: int | None = None) -> None:
        proxy = Proxy(sessions, ledger, lambda: bool(pool.config.api_keys))
        self.context = GatewayContext(pool, memory, logs, ledger, proxy, accounts,
                                      listen_host=listen_host.strip("[]").lower(), metrics_port=metrics_port)
        self.app = web.Application(middlewares=Middlewares(self.context).chain(),
                                   client_max_size=pool.config.max_body_bytes)
        self.app.on_response_prepare.append(cors_headers)
        self.app.cleanup_ctx.append(sessions.context)
        for register in ROUTE_FAMILIES:
            register(self.app.router, self.context)
