"""The dashboard's page at /ui/. The calls it makes are served under /ui/api/ by the route family each
belongs to (listings, observability, admin, logs, inference), so that a browser that logged in with HTTP
basic auth on /ui/ sends its credentials with every call."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from berth.gateway.context import GatewayContext


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    router.add_get("/ui", redirect)
    router.add_get("/ui/", page)


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


async def page(request: web.Request) -> web.Response:
    body = resources.files("berth.ui").joinpath("index.html").read_bytes()
    return web.Response(body=body, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"})
