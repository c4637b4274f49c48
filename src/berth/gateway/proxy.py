"""Forwarding one request to a model server and streaming the answer back unbuffered."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from berth.config import UpstreamTimeouts
from berth.core.errors import UpstreamError, UpstreamTimeout
from berth.gateway.metrics import Metrics
from berth.gateway.pool import Lease

# Headers that describe one hop, not the message (RFC 9110 section 7.6.1), plus ones aiohttp recomputes.
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}
_TAIL_BYTES = 8192  # enough of the end of a response to find its `usage` object
_ERROR_BODY_LIMIT = 256 * 1024  # error bodies are small; a larger one is cut before it is rewritten
_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
                   429: "rate_limit_error"}


def openai_error(status: int, body: bytes) -> dict | None:
    """A model server's error body in OpenAI's shape (string `type` and `code`), the original kept under
    `upstream`; None when it is in that shape already. llama.cpp, for one, sends an integer `code`."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and all(isinstance(error.get(k), str) for k in ("message", "type", "code")):
        return None
    message = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
    elif isinstance(error, str):
        message = error
    elif isinstance(parsed, dict) and "detail" in parsed:  # FastAPI-style servers (vLLM and others)
        detail = parsed["detail"]
        message = detail if isinstance(detail, str) else json.dumps(detail)
    text = body.decode("utf-8", errors="replace").strip()
    if not message:
        message = text[:2000] or f"the model server answered HTTP {status} with an empty body"
    kind = error.get("type") if isinstance(error, dict) else None
    if not isinstance(kind, str):
        kind = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(code, str):
        code = kind if isinstance(error, dict) and isinstance(error.get("type"), str) else f"upstream_http_{status}"
    return {"error": {"message": message, "type": kind, "code": code,
                      "upstream": parsed if parsed is not None else text}}


_AUTH_HEADERS = {"authorization", "x-api-key"}


def _request_headers(request: web.Request, drop_auth: bool) -> dict[str, str]:
    """The client's headers to pass on; with `drop_auth`, not its key (it was for berth, or a peer's own
    key replaces it), however the client spelled the header's name."""
    dropped = _HOP_BY_HOP | _AUTH_HEADERS if drop_auth else _HOP_BY_HOP
    return {k: v for k, v in request.headers.items() if k.lower() not in dropped}


def _client_timeout(timeouts: UpstreamTimeouts, https: bool) -> aiohttp.ClientTimeout:
    # sock_read bounds every wait for data, the status line included; 0 means no limit. `connect` spans
    # the TCP connect and, for https, the TLS handshake.
    whole = timeouts.connect + timeouts.tls_handshake if https and timeouts.connect else timeouts.connect
    return aiohttp.ClientTimeout(total=None, connect=whole or None, sock_connect=timeouts.connect or None,
                                 sock_read=timeouts.idle or None)


async def _open(session: aiohttp.ClientSession, method: str, url: str, body: bytes | None,
                headers: dict[str, str], timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """Send the request; once more if the connection closes before any response byte.

    That is what a pooled keep-alive connection the model server has just closed looks like:
    the server answered nothing, so sending again (aiohttp has dropped that connection; the
    retry takes another or opens one) is what HTTP clients do for idle pooled connections.
    """
    try:
        return await session.request(method, url, data=body, headers=headers, timeout=timeout,
                                     allow_redirects=False)
    except aiohttp.ServerDisconnectedError:
        return await session.request(method, url, data=body, headers=headers, timeout=timeout,
                                     allow_redirects=False)


def _limit(timeouts: UpstreamTimeouts) -> str:
    limits = [f"{name} {value:g}s" for name, value in (("timeouts.responseHeader", timeouts.response_header),
                                                         ("timeouts.idle", timeouts.idle),
                                                         ("timeouts.connect", timeouts.connect)) if value]
    return " / ".join(limits) or "its timeouts"


def _rewritable(upstream: aiohttp.ClientResponse) -> bool:
    """Only whole, uncompressed bodies are read and rewritten; streams and encoded bodies pass as sent."""
    encoding = upstream.headers.get("Content-Encoding", "identity").lower()
    return encoding == "identity" and not upstream.headers.get("Content-Type", "").startswith("text/event-stream")


@dataclass(frozen=True)
class Upstream:
    """Where one request goes: a leased model's server, or a peer."""

    model: str  # the id metrics and messages name
    base_url: str  # the request's path is appended
    timeouts: UpstreamTimeouts
    headers: tuple[tuple[str, str], ...] = ()  # set on the request (a peer's key)
    restore_hit: bool = False  # the first request after a KV slot restore: count its cache hits
    explain: Callable[[], Awaitable[str | None]] | None = None  # why an answer broke off (an rpc agent gone)

    @classmethod
    def of(cls, lease: Lease) -> "Upstream":
        process = lease.process
        return cls(process.spec.id, process.spec.proxy, process.spec.timeouts,
                   restore_hit=process.take_restore_hit(),
                   explain=process.explain_failure if process.spec.rpc is not None else None)

    async def failure_detail(self) -> str:
        """"; <why>" when something beyond the model server explains a failure, else ""."""
        why = await self.explain() if self.explain is not None else None
        return f"; {why}" if why else ""


async def forward(
    request: web.Request,
    target: Upstream,
    path: str,
    body: bytes | None,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    drop_auth: bool,
    rewrite_errors: bool = True,
    into: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """Send `body` to `target` at `path` and stream its answer to the client.

    With `rewrite_errors`, an error answer (4xx/5xx, not a stream) is returned in OpenAI's error shape.
    `into` is an event stream already under way to the client (sendLoadingState): the answer's data
    is appended to it, and an error answer becomes an error event.
    """
    model = target.model
    url = target.base_url + path
    if request.query_string:
        url += "?" + request.query_string
    began = time.perf_counter()
    status = 502
    usage: dict = {}
    timeouts = target.timeouts
    headers = _request_headers(request, drop_auth or bool(target.headers))
    headers.update(target.headers)
    opening = _open(session, request.method, url, body, headers, _client_timeout(timeouts, url.startswith("https:")))
    try:
        upstream_response = await (asyncio.wait_for(opening, timeouts.response_header)
                                   if timeouts.response_header else opening)
        async with upstream_response as upstream:
            status = upstream.status
            metrics.ttfb.labels(model).observe(time.perf_counter() - began)
            if (rewrite_errors or into is not None) and status >= 400 and _rewritable(upstream):
                raw = await upstream.content.read(_ERROR_BODY_LIMIT)
                rewritten = openai_error(status, raw)
                if into is not None:
                    event = json.dumps(rewritten) if rewritten is not None else raw.decode(errors="replace")
                    await into.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())
                    await into.write_eof()
                    return into
                if rewritten is not None:
                    return web.json_response(rewritten, status=status)
                return web.Response(body=raw, status=status, content_type="application/json")
            is_sse = into is not None or upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            if into is not None:
                response = into
            else:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _HOP_BY_HOP or name.lower() == "content-length":
                        response.headers.add(name, value)
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
                status = 504 if isinstance(exc, asyncio.TimeoutError) else 502
                if is_sse:
                    why = (f"sent nothing for timeouts.idle ({timeouts.idle:g}s)" if status == 504
                           else f"stopped answering mid-stream: {exc or type(exc).__name__}"
                                + await target.failure_detail())
                    error = UpstreamError(f"model {model!r} {why}")
                    await response.write(b"data: " + json.dumps(error.to_openai()).encode() + b"\n\n")
                else:  # the status line is gone; a cut connection is the only honest signal left
                    if request.transport is not None:
                        request.transport.close()
                    return response
            usage = metrics.record_usage(model, tail)
            if target.restore_hit:
                metrics.record_restore_hit(model, tail)
            await response.write_eof()
            return response
    except asyncio.TimeoutError:  # a limit ran out before the status line
        status = 504
        raise UpstreamTimeout(
            f"model {model!r} sent no answer within {_limit(timeouts)}; it may be hung or overloaded (raise "
            "its `timeouts` in the config if it is just slow)") from None
    except aiohttp.ClientConnectionError as exc:
        raise UpstreamError(f"model {model!r} is not reachable at {target.base_url}: {exc}"
                            + await target.failure_detail()) from None
    finally:
        elapsed = time.perf_counter() - began
        metrics.requests.labels(model, str(status)).inc()
        metrics.latency.labels(model).observe(elapsed)
        metrics.record_request(model, path, status, elapsed, usage)
