"""Forwarding one request to a model server and streaming the answer back unbuffered."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from aiohttp import web

from berth.errors import UpstreamError
from berth.gateway.metrics import Metrics
from berth.gateway.pool import Lease

# Headers that describe one hop, not the message (RFC 9110 section 7.6.1), plus ones aiohttp recomputes.
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}
_TAIL_BYTES = 8192  # enough of the end of a response to find its `usage` object
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


def _request_headers(request: web.Request, drop_auth: bool) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    if drop_auth:  # the client's key was for berth, not for the model server
        for name in ("Authorization", "X-Api-Key"):
            headers.pop(name, None)
    return headers


async def _open(session: aiohttp.ClientSession, method: str, url: str, body: bytes | None,
                headers: dict[str, str]) -> aiohttp.ClientResponse:
    """Send the request; once more if the connection closes before any response byte.

    That is what a pooled keep-alive connection the model server has just closed looks like:
    the server answered nothing, so sending again (aiohttp has dropped that connection; the
    retry takes another or opens one) is what HTTP clients do for idle pooled connections.
    """
    try:
        return await session.request(method, url, data=body, headers=headers, timeout=_NO_TIMEOUT,
                                     allow_redirects=False)
    except aiohttp.ServerDisconnectedError:
        return await session.request(method, url, data=body, headers=headers, timeout=_NO_TIMEOUT,
                                     allow_redirects=False)


async def forward(
    request: web.Request,
    lease: Lease,
    path: str,
    body: bytes | None,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    drop_auth: bool,
) -> web.StreamResponse:
    """Send `body` to the leased model at `path` and stream its answer to the client."""
    spec = lease.process.spec
    model = spec.id
    restore_hit = lease.process.take_restore_hit()
    url = spec.proxy + path
    if request.query_string:
        url += "?" + request.query_string
    began = time.perf_counter()
    status = 502
    usage: dict = {}
    try:
        async with await _open(session, request.method, url, body, _request_headers(request, drop_auth)) as upstream:
            status = upstream.status
            metrics.ttfb.labels(model).observe(time.perf_counter() - began)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_BY_HOP or name.lower() == "content-length":
                    response.headers.add(name, value)
            is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            await response.prepare(request)
            tail = b""
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    tail = (tail + chunk)[-_TAIL_BYTES:]
            except ConnectionResetError:
                status = 499  # the client went away; leaving the block cancels the upstream request
                return response
            except asyncio.CancelledError:
                status = 499  # aiohttp cancels the handler when the client disconnects
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = 502
                if is_sse:
                    error = UpstreamError(f"model {model!r} stopped answering mid-stream: {exc or type(exc).__name__}")
                    await response.write(b"data: " + json.dumps(error.to_openai()).encode() + b"\n\n")
                else:  # the status line is gone; a cut connection is the only honest signal left
                    request.transport and request.transport.close()
                    return response
            usage = metrics.record_usage(model, tail)
            if restore_hit:
                metrics.record_restore_hit(model, tail)
            await response.write_eof()
            return response
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        raise UpstreamError(f"model {model!r} is not reachable at {spec.proxy}: {exc}") from None
    finally:
        elapsed = time.perf_counter() - began
        metrics.requests.labels(model, str(status)).inc()
        metrics.latency.labels(model).observe(elapsed)
        metrics.record_request(model, path, status, elapsed, usage)
