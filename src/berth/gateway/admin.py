"""Loading and unloading models (llama-server's router mode, llama-swap's routes, the dashboard's buttons)
and choosing the active profile."""

from __future__ import annotations

import logging

from aiohttp import web

from berth.core.errors import BadRequest
from berth.gateway.access import ADMIN, scope
from berth.gateway.context import GatewayContext, Routes, parse_json, require_body_type

log = logging.getLogger("berth.gateway")


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    routes = Admin(context)
    router.add_post("/unload", routes.unload_all)
    router.add_post("/models/load", routes.load)  # llama-server's router mode
    router.add_post("/models/unload", routes.unload)
    router.add_post("/ui/api/models/load", routes.load)  # the same for the dashboard (see dashboard.py)
    router.add_post("/ui/api/models/unload", routes.unload)
    router.add_post("/api/models/unload", routes.unload_by_path)  # llama-swap's (Open WebUI's eject button)
    router.add_post("/api/models/unload/{model:.+}", routes.unload_by_path)
    router.add_get("/api/profiles", routes.profiles)
    router.add_put("/api/profiles/active", routes.activate_profile)


class Admin(Routes):
    @scope(ADMIN)
    async def unload_all(self, request: web.Request) -> web.Response:
        require_body_type(request)
        await self.context.pool.unload(None, force=request.query.get("force") in ("1", "true"))
        return web.Response(text="OK")

    @scope(ADMIN)
    async def unload_by_path(self, request: web.Request) -> web.Response:
        require_body_type(request)
        name = request.match_info.get("model")
        pool = self.context.pool
        outcome = await pool.unload(pool.resolve(name) if name else None)
        return web.json_response({"success": True, "unloaded": outcome})

    @scope(ADMIN)
    async def load(self, request: web.Request) -> web.Response:
        await self.context.pool.load(await self._model_from_body(request))
        return web.json_response({"success": True})

    @scope(ADMIN)
    async def unload(self, request: web.Request) -> web.Response:
        outcome = await self.context.pool.unload(await self._model_from_body(request))
        return web.json_response({"success": True, "unloaded": outcome})

    async def _model_from_body(self, request: web.Request) -> str:
        require_body_type(request)
        payload = parse_json(await self.context.read_body(request))
        name = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequest('body must name the model: {"model": "<id>"}')
        return self.context.pool.resolve(name)

    @scope(ADMIN)
    async def profiles(self, request: web.Request) -> web.Response:
        """llama-swap's profile list: the active one (or null) and each profile's pins."""
        config = self.context.config
        return web.json_response({
            "active": self.context.naming.active_profile(config),
            "profiles": [{"id": p.id, "description": p.description, "pins": dict(p.pins)}
                         for p in sorted(config.profiles.values(), key=lambda p: p.id)]})

    @scope(ADMIN)
    async def activate_profile(self, request: web.Request) -> web.Response:
        """`{"name": "coding"}` makes that profile active; `{"name": null}` none."""
        require_body_type(request)
        payload = parse_json(await self.context.read_body(request) or b"null")
        if not isinstance(payload, dict) or "name" not in payload:
            raise BadRequest('send {"name": "<profile>"} (or {"name": null} for none)')
        if payload["name"] is not None and not isinstance(payload["name"], str):
            raise BadRequest("the profile name must be a string or null")
        self.context.naming.activate(self.context.config, payload["name"])
        log.info("active profile: %s", payload["name"])
        return web.json_response({"active": self.context.naming.active_profile(self.context.config)})
