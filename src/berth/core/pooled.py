"""HTTP requests over pooled keep-alive connections that the server may have closed meanwhile.

llama-server (cpp-httplib) closes its connection after every streamed answer although it announces
`Keep-Alive`, and any idle one after 5 s; uvicorn closes idle ones after 5 s. A request sent on such a
pooled connection before the client has seen the close fails before any answer byte: aiohttp reports it
as ServerDisconnectedError, or as ClientOSError when the write or the read meets the reset (the usual
case with llama-server). The server never took that request, so it is sent again on another connection
(the failed one has left the pool), as HTTP clients do. A failure on a fresh connection is the server's
own and is raised (it may have seen the request), unless the caller allows `fresh_retries` for a server
that closed a fresh connection without answering (berth's proxy allows one, as it always has).

A session sends with `request` only if it was made with `trace_configs=[reuse_tracing()]`: that is how
an attempt learns whether it went out on a pooled connection.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import aiohttp

# Each stale connection leaves the pool when it fails, so a retry takes the next pooled one or a new one;
# more than this many stale ones in a row means something else is wrong.
MAX_STALE_RETRIES = 16
STALE_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


async def _on_connection_reuse(session: aiohttp.ClientSession, context: SimpleNamespace, params: object) -> None:
    if isinstance(context.trace_request_ctx, _Attempt):  # only requests sent by `request` carry one
        context.trace_request_ctx.reused = True


def reuse_tracing() -> aiohttp.TraceConfig:
    """For the sessions `request` sends with: tells each attempt whether it took a pooled connection."""
    config = aiohttp.TraceConfig()
    config.on_connection_reuseconn.append(_on_connection_reuse)
    return config


class _Attempt(SimpleNamespace):
    reused: bool = False


async def request(session: aiohttp.ClientSession, method: str, url: str, *,
                  on_retry: Callable[[], None] | None = None, fresh_retries: int = 0,
                  **kwargs: Any) -> aiohttp.ClientResponse:
    """`session.request(method, url, **kwargs)` (returns once the answer's headers are in), sent again
    while it fails on a pooled connection the server had closed, and up to `fresh_retries` times when
    the server closes a fresh one without a byte of answer; `on_retry` is called before each resend."""
    retries = 0
    while True:
        attempt = _Attempt()
        try:
            return await session.request(method, url, trace_request_ctx=attempt, **kwargs)
        except STALE_ERRORS as exc:
            # ClientConnectorError (no connection at all) is a ClientOSError too, but never on a reused one
            if attempt.reused:
                if retries >= MAX_STALE_RETRIES:
                    raise
            elif isinstance(exc, aiohttp.ServerDisconnectedError) and fresh_retries > 0:
                fresh_retries -= 1
            else:
                raise
            retries += 1
            if on_retry is not None:
                on_retry()
