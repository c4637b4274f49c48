"""A key's own view: `GET /api/usage` (what keys used, by model and hour; a key sees its own, `admin` every
key's) and the dashboard's `GET /ui/api/whoami` (what the key it logged in with may do)."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from aiohttp import web

from berth.config import KEY_SCOPES
from berth.core.errors import BadRequest
from berth.gateway.access import ADMIN, ANY_KEY, request_key, scope
from berth.gateway.context import GatewayContext, Routes

DEFAULT_SINCE_SECONDS = 86400
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    routes = Usage(context)
    router.add_get("/api/usage", routes.usage)
    router.add_get("/ui/api/usage", routes.usage)
    router.add_get("/ui/api/whoami", routes.whoami)


class Usage(Routes):
    @scope(ANY_KEY)
    async def usage(self, request: web.Request) -> web.Response:
        """`?since=` (default 24h ago) and `?key=`: requests, errors and tokens per key, per model and per
        hour, from the start of the hour `since` falls in."""
        since = parse_since(request.query.get("since", ""), time.time())
        key = request_key(request)
        wanted = request.query.get("key") or None
        if key is not None and ADMIN not in key.scopes:
            if wanted not in (None, key.name):
                self.context.require(request, ADMIN)  # another key's usage
            wanted = key.name
        return web.json_response(await self.context.accounts.usage(since, wanted))

    @scope(ANY_KEY)
    async def whoami(self, request: web.Request) -> web.Response:
        """The key the dashboard logged in with: its name, scopes, models and limits (all, without keys)."""
        key = request_key(request)
        if key is None:
            return web.json_response({"key": None, "scopes": list(KEY_SCOPES),
                                      "models": ["*"], "limits": {}})
        limits = key.limits
        return web.json_response({
            "key": key.name, "scopes": sorted(key.scopes), "models": list(key.models),
            "limits": {"requestsPerMinute": limits.requests_per_minute, "tokensPerDay": limits.tokens_per_day,
                       "concurrency": limits.concurrency},
            "tokens_today": self.context.accounts.tokens_today(key.name)})


def parse_since(text: str, now: float) -> float:
    """`since` as epoch seconds: a duration back from now (`90m`, `24h`, `7d`), epoch seconds, or an ISO 8601
    date or time (UTC unless it names its offset)."""
    text = text.strip()
    if not text:
        return now - DEFAULT_SINCE_SECONDS
    duration = _DURATION.match(text)
    if duration:
        return now - float(duration.group(1)) * _UNIT_SECONDS[duration.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"since={text!r} is not a time; give a duration back from now (24h, 7d), epoch seconds "
                         "or an ISO 8601 date or time (2025-06-01, 2025-06-01T12:00:00Z)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
