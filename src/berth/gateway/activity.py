"""The requests berth serves, as the dashboard's activity view and scripts see them: the ones in flight and
the recent ones (/api/requests), one with its captured bodies (/api/requests/{id}), and an admin's cancel of
one whose answer is streaming (POST /api/requests/{id}/cancel). The ledger holds them (ledger.py)."""

from __future__ import annotations

from aiohttp import web

from berth.core.errors import RequestNotCancellable, RequestNotFound
from berth.gateway.access import ADMIN, LOGS, scope
from berth.gateway.context import GatewayContext, Routes
from berth.gateway.ledger import RequestRecord


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    routes = Activity(context)
    for prefix in ("/api", "/ui/api"):
        router.add_get(prefix + "/requests", routes.recent)
        router.add_get(prefix + "/requests/{id}", routes.detail)
        router.add_post(prefix + "/requests/{id}/cancel", routes.cancel)


class Activity(Routes):
    @scope(LOGS)
    async def recent(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.context.ledger.recent(),
                                  "capture_bodies": self.context.ledger.capture_bodies})

    @scope(LOGS)
    async def detail(self, request: web.Request) -> web.Response:
        return web.json_response(self._record(request).detail())

    @scope(ADMIN)
    async def cancel(self, request: web.Request) -> web.Response:
        record = self._record(request)
        if self.context.ledger.cancel(record.id) is None:
            raise RequestNotCancellable(record.id, record.ended is not None)
        return web.json_response({"id": record.id, "cancelled": True})

    def _record(self, request: web.Request) -> RequestRecord:
        raw = request.match_info["id"]
        record = self.context.ledger.find(int(raw)) if raw.isdigit() else None
        if record is None:
            raise RequestNotFound(raw)
        return record
