"""The dashboard at /ui/: its page, script and style sheet, all served by berth (no external assets). The
calls it makes are served under /ui/api/ by the route family each belongs to (listings, observability,
activity, admin, logs, inference), so that a browser that logged in with HTTP basic auth on /ui/ sends its
credentials with every call.

The page runs under a Content-Security-Policy that allows its own script and style sheet and nothing else:
no inline script or style, no other scripts, no requests to other origins, no forms, and no page may frame
it (so no page can dress its buttons up as its own). A berth anyone on the network may use says so in a
banner."""

from __future__ import annotations

import functools
import html
from importlib import resources

from aiohttp import web

from berth.gateway.access import ANY_KEY, scope
from berth.gateway.context import GatewayContext
from berth.gateway.exposure import open_without_keys

_BANNER_PLACE = "<!--berth:exposure-->"
# the page's files: name under /ui/ -> content type
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
          "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": POLICY, "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    router.add_get("/ui", redirect)
    router.add_get("/ui/", functools.partial(page, context))
    router.add_get("/ui/app.js", asset)
    router.add_get("/ui/app.css", asset)


@scope(ANY_KEY)
async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


@scope(ANY_KEY)
async def page(context: GatewayContext, request: web.Request) -> web.Response:
    exposed = open_without_keys(context.listen_host, context.config)
    banner = f'<div id="exposure" role="alert">{html.escape(exposed)}</div>' if exposed else ""
    return web.Response(text=_text("index.html").replace(_BANNER_PLACE, banner), content_type="text/html",
                        charset="utf-8", headers=_HEADERS)


@scope(ANY_KEY)
async def asset(request: web.Request) -> web.Response:
    name = request.path.removeprefix("/ui/")
    return web.Response(text=_text(name), content_type=ASSETS[name], charset="utf-8", headers=_HEADERS)


@functools.cache
def _text(name: str) -> str:
    """One of the page's files (package data: it never changes while berth runs)."""
    return resources.files("berth.ui").joinpath(name).read_text(encoding="utf-8")
