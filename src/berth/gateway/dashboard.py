"""The dashboard's page at /ui/. The calls it makes are served under /ui/api/ by the route family each
belongs to (listings, observability, admin, logs, inference), so that a browser that logged in with HTTP
basic auth on /ui/ sends its credentials with every call.

The page runs under a Content-Security-Policy that allows its own inline script and style (by their hashes)
and nothing else: no other scripts, no requests to other origins, no forms, and no page may frame it (so no
page can dress its buttons up as its own). A berth anyone on the network may use says so in a banner."""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import re
from importlib import resources

from aiohttp import web

from berth.gateway.access import ANY_KEY, scope
from berth.gateway.context import GatewayContext
from berth.gateway.exposure import open_without_keys

_BANNER_PLACE = "<!--berth:exposure-->"


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    router.add_get("/ui", redirect)
    router.add_get("/ui/", functools.partial(page, context))


@scope(ANY_KEY)
async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


@scope(ANY_KEY)
async def page(context: GatewayContext, request: web.Request) -> web.Response:
    text, policy = _page()
    exposed = open_without_keys(context.listen_host, context.config)
    banner = f'<div id="exposure" role="alert">{html.escape(exposed)}</div>' if exposed else ""
    return web.Response(text=text.replace(_BANNER_PLACE, banner), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": policy,
                                 "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer"})


@functools.cache
def _page() -> tuple[str, str]:
    """The page (package data: it never changes while berth runs) and its Content-Security-Policy."""
    text = resources.files("berth.ui").joinpath("index.html").read_text(encoding="utf-8")
    scripts, styles = _inline_hashes(text, "script"), _inline_hashes(text, "style")
    policy = (f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return text, policy


def _inline_hashes(text: str, tag: str) -> str:
    """CSP sources for every inline <tag> element of the page: the sha256 of its text, as browsers hash it."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)
