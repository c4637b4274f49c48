"""Forwarding one request to a model server and streaming the answer back unbuffered.

Three ways to hand the answer on, one function each: `answer` (a response of its own, error answers in
OpenAI's shape: passed on when they are, wrapped when not; or with a `Reframe` another API's answer made
from it as it arrives: Ollama's), `pass_through` (as the model server sent it: /upstream) and
`continue_stream` (appended to an event stream already under way: sendLoadingState). Each request is
counted in the shared ledger.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from berth.config import UpstreamTimeouts
from berth.core import pooled
from berth.core.errors import BerthError, RequestCancelled, UpstreamError, UpstreamTimeout
from berth.gateway import capture
from berth.gateway.ledger import Outcome, RequestLedger, RequestRecord
from berth.gateway.sessions import UpstreamSessions
from berth.gateway.upstream import Upstream

# Headers that describe one hop, not the message (RFC 9110 section 7.6.1), plus ones aiohttp recomputes.
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}
_TAIL_BYTES = 8192  # enough of the end of a response to find its `usage` object
_ERROR_BODY_LIMIT = 256 * 1024  # error bodies are small; a larger one is cut before it is wrapped
_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
                   429: "rate_limit_error"}


def openai_error(status: int, body: bytes) -> dict[str, Any] | None:
    """None when a model server's error body is JSON in OpenAI's shape already (an `error` object with a
    string `message` and `type`; llama.cpp's integer `code` and its own fields such as `n_ctx` included):
    it goes to the client unchanged. Any other body is wrapped in that shape, its text kept: as the message
    when no message can be read from it, and whole under `upstream`."""
    shaped, as_sent = _in_openai_shape(status, body)
    return None if as_sent else shaped


def error_message(status: int, body: bytes) -> str:
    """The message of a model server's error answer, whatever its shape."""
    message: str = _in_openai_shape(status, body)[0]["error"]["message"]
    return message


def _in_openai_shape(status: int, body: bytes) -> tuple[dict[str, Any], bool]:
    """A model server's error answer in OpenAI's shape (see `openai_error`), and whether it was sent so."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(parsed, dict) and isinstance(error, dict) and all(isinstance(error.get(k), str)
                                                                    for k in ("message", "type")):
        return parsed, True
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
        message = text or f"the model server answered HTTP {status} with an empty body"
    kind = error.get("type") if isinstance(error, dict) else None
    if not isinstance(kind, str):
        kind = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(code, str):
        code = kind if isinstance(error, dict) and isinstance(error.get("type"), str) else f"upstream_http_{status}"
    return {"error": {"message": message, "type": kind, "code": code,
                      "upstream": parsed if parsed is not None else text}}, False


class Reframe(Protocol):
    """Another API's answer, made from a model server's OpenAI-shaped one as it arrives (Ollama's NDJSON from
    an event stream, or one object from a JSON body). The proxy still counts the request, reads its usage
    from what the model server sent, and notices a client that leaves."""

    content_type: str  # of the answer the client gets

    def refused(self, status: int, message: str) -> web.Response:
        """The model server answered with an error (a whole body, not a stream)."""

    def feed(self, chunk: bytes) -> bytes:
        """The next bytes of the model server's answer in; what to send the client now out."""

    def close(self, record: RequestRecord) -> bytes:
        """The answer ended: what is left to send (`record` says when the request came and went on)."""

    def failed(self, error: BerthError) -> bytes:
        """The answer broke off (the model server died, went silent): what tells the client so."""


class Cancelled(Exception):
    """Set on an answer's stream when an admin cancels the request (it ends the relay)."""


_CREDENTIALS = {"authorization", "x-api-key", "cookie"}
# A browser's page: berth alone decides on it (origins.py); a model server that saw it would echo it as allowed.
_PAGE_HEADERS = {"origin"}


def _request_headers(request: web.Request, with_credentials: bool) -> dict[str, str]:
    """The client's headers to pass on, however it spelled their names; its credentials only `with_credentials`
    (they were for berth, a peer is a server of someone else's, a key of berth's replaces them)."""
    dropped = _HOP_BY_HOP | _PAGE_HEADERS | (set() if with_credentials else _CREDENTIALS)
    return {k: v for k, v in request.headers.items() if k.lower() not in dropped}


def _client_timeout(timeouts: UpstreamTimeouts, https: bool) -> aiohttp.ClientTimeout:
    # sock_read bounds every wait for data, the status line included; 0 means no limit. `connect` spans
    # the TCP connect and, for https, the TLS handshake.
    whole = timeouts.connect + timeouts.tls_handshake if https and timeouts.connect else timeouts.connect
    return aiohttp.ClientTimeout(total=None, connect=whole or None, sock_connect=timeouts.connect or None,
                                 sock_read=timeouts.idle or None)


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
class Outbound:
    """One request on its way to a model server: where, which path (the client's query is added), what body."""

    target: Upstream
    path: str
    body: bytes | None
    method: str | None = None  # the client's method when None


class Proxy:
    def __init__(self, sessions: UpstreamSessions, ledger: RequestLedger, keys_in_use: Callable[[], bool]) -> None:
        self._sessions = sessions
        self._ledger = ledger
        self._keys_in_use = keys_in_use  # the client's key was for berth: it does not go on

    async def answer(self, request: web.Request, outbound: Outbound, record: RequestRecord,
                     reframe: Reframe | None = None) -> web.StreamResponse:
        """The model server's answer as the response; an error answer (4xx/5xx, not a stream) that is not
        in OpenAI's error shape is wrapped in it, with the model server's status and headers. With
        `reframe`, the answer `reframe` makes of it."""
        async with self._exchange(request, outbound, record) as exchange:
            if exchange.is_plain_error():
                raw = await exchange.error_body()
                status = exchange.upstream.status
                if reframe is not None:
                    return reframe.refused(status, error_message(status, raw))
                wrapped = openai_error(status, raw)
                if wrapped is not None:
                    return web.json_response(wrapped, status=status,
                                             headers=exchange.headers(but=("content-type", "content-length")))
                response = await exchange.respond()  # OpenAI's shape already: on as sent, every field kept
                await response.write(raw)
                return await exchange.relay(response, False)
            if reframe is not None:
                response = web.StreamResponse(status=exchange.upstream.status,
                                              headers={"Content-Type": reframe.content_type})
                await response.prepare(request)
                return await exchange.relay(response, exchange.is_event_stream(), reframe)
            return await exchange.relay(await exchange.respond(), exchange.is_event_stream())

    async def pass_through(self, request: web.Request, outbound: Outbound,
                           record: RequestRecord) -> web.StreamResponse:
        """The model server's answer exactly as it sent it (its own UI and API, under /upstream)."""
        async with self._exchange(request, outbound, record) as exchange:
            return await exchange.relay(await exchange.respond(), exchange.is_event_stream())

    async def continue_stream(self, request: web.Request, outbound: Outbound, record: RequestRecord,
                              into: web.StreamResponse) -> web.StreamResponse:
        """Append the answer's events to `into`, an event stream already under way to the client
        (sendLoadingState); an error answer becomes an error event."""
        async with self._exchange(request, outbound, record) as exchange:
            if exchange.is_plain_error():
                raw = await exchange.error_body()
                rewritten = openai_error(exchange.upstream.status, raw)
                event = json.dumps(rewritten) if rewritten is not None else raw.decode(errors="replace")
                await into.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())
                await into.write_eof()
                return into
            return await exchange.relay(into, True)

    @asynccontextmanager
    async def _exchange(self, request: web.Request, outbound: Outbound,
                        record: RequestRecord) -> AsyncIterator[_Exchange]:
        """Send the request; yield once its status line is in. Failures to get one become typed errors;
        whatever happens, the request is counted once."""
        target, timeouts = outbound.target, outbound.target.timeouts
        url = target.base_url + outbound.path + (f"?{request.query_string}" if request.query_string else "")
        headers = _request_headers(request, target.takes_client_credentials and not self._keys_in_use())
        headers.update(target.headers)
        self._ledger.sent(record)
        self._sessions.spare_taken(target.base_url)
        self._ledger.capture_request(record, outbound.body, request.headers.get("Content-Type", ""))
        # sent again on another connection when a pooled one proves closed, and once when the model server
        # closes a fresh one before any answer byte (core/pooled.py): nothing has reached the client yet
        opening = pooled.request(self._sessions.proxy, outbound.method or request.method, url, data=outbound.body,
                                 headers=headers, timeout=_client_timeout(timeouts, url.startswith("https:")),
                                 allow_redirects=False, fresh_retries=1)
        outcome = Outcome.FAILED
        exchange: _Exchange | None = None
        try:
            # asyncio.timeout, not wait_for: wait_for runs `opening` as a task of its own, one more loop turn
            async with asyncio.timeout(timeouts.response_header or None):
                upstream_response = await opening
            async with upstream_response as upstream:
                self._ledger.first_byte(record, upstream.status)
                exchange = _Exchange(request, target, record, upstream, self._ledger,
                                     lambda: self._sessions.open_spare(target))
                yield exchange
                outcome = exchange.outcome or Outcome.ANSWERED
        except asyncio.TimeoutError:  # a limit ran out before the status line
            record.status = 504
            raise UpstreamTimeout(
                f"model {target.model!r} sent no answer within {_limit(timeouts)}; it may be hung or overloaded "
                "(raise its `timeouts` in the config if it is just slow)") from None
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamError(f"model {target.model!r} is not reachable at {target.base_url}: {exc}"
                                + await target.failure_detail()) from None
        except asyncio.CancelledError:
            outcome = exchange.outcome if exchange is not None and exchange.outcome else Outcome.CLIENT_GONE
            raise
        finally:
            self._ledger.end(record, outcome)


@dataclass
class _Exchange:
    """A model server's answer whose status line has arrived."""

    request: web.Request
    target: Upstream
    record: RequestRecord
    upstream: aiohttp.ClientResponse
    ledger: RequestLedger
    open_spare: Callable[[], None]  # a fresh connection to the model server for its next request
    outcome: Outcome | None = None  # set once the answer's relay ended (None: it never began, or is under way)

    def is_plain_error(self) -> bool:
        return self.upstream.status >= 400 and _rewritable(self.upstream)

    def is_event_stream(self) -> bool:
        return self.upstream.headers.get("Content-Type", "").startswith("text/event-stream")

    async def error_body(self) -> bytes:
        return await self.upstream.content.read(_ERROR_BODY_LIMIT)

    def headers(self, but: tuple[str, ...] = ()) -> CIMultiDict[str]:
        """The model server's headers that describe its answer (not the hop), less those named in `but`."""
        return CIMultiDict((name, value) for name, value in self.upstream.headers.items()
                           if (name.lower() not in _HOP_BY_HOP or name.lower() == "content-length")
                           and name.lower() not in but)

    async def respond(self) -> web.StreamResponse:
        """A response to the client with the model server's status and headers, under way."""
        response = web.StreamResponse(status=self.upstream.status, reason=self.upstream.reason,
                                      headers=self.headers())
        await response.prepare(self.request)
        return response

    async def relay(self, response: web.StreamResponse, is_sse: bool,
                    reframe: Reframe | None = None) -> web.StreamResponse:
        """Stream the answer's body into `response` as it arrives (through `reframe` when given), then read
        its token counts. An admin's cancel ends it early: a stream gets an error event and its end, and the
        model server's request is dropped when the exchange closes."""
        tail = b""
        head = b""
        broke_off = False
        relayed = 0
        capturing = self.ledger.capture_bodies
        content = self.upstream.content
        self.record.cancel = lambda: content.set_exception(Cancelled())
        try:
            async for chunk in content.iter_any():
                if not relayed:
                    self.ledger.first_token(self.record)
                tail = (tail + chunk)[-_TAIL_BYTES:]  # before the write: what the server sent counts, come what may
                relayed += len(chunk)
                if capturing and len(head) < capture.BODY_LIMIT:
                    head += chunk[:capture.BODY_LIMIT - len(head)]
                out = chunk if reframe is None else reframe.feed(chunk)
                if out:
                    await response.write(out)
        except Cancelled:
            return await self._end_cancelled(response, is_sse, reframe, (tail, head, relayed))
        except ConnectionResetError:
            self._client_left(tail, relayed, is_sse)  # leaving the block cancels the upstream request
            return response
        except asyncio.CancelledError:
            self._client_left(tail, relayed, is_sse)  # aiohttp cancels the handler when the client disconnects
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if not await self._break_off(response, is_sse, reframe, exc):
                return response
            broke_off = True
        self._settle((tail, head, relayed))
        if is_sse and not broke_off and self.target.spare_path is not None:
            # llama-server closes the connection it streamed on, maybe not before berth's next request takes
            # it from the pool: berth closes it, and a spare opens before the client has read the end
            self.upstream.close()
            self.open_spare()
        if reframe is not None and not broke_off:
            await response.write(reframe.close(self.record))
        self.outcome = self.outcome or Outcome.ANSWERED
        await response.write_eof()
        return response

    def _settle(self, read: tuple[bytes, bytes, int]) -> None:
        """The answer's body is over (whole or cancelled): no more cancels; count its tokens, keep its capture."""
        tail, head, relayed = read
        self.record.cancel = None
        self.ledger.read_usage(self.record, tail, self.target.restore_hit)
        self.ledger.capture_response(self.record, head, relayed)

    async def _end_cancelled(self, response: web.StreamResponse, is_sse: bool, reframe: Reframe | None,
                             read: tuple[bytes, bytes, int]) -> web.StreamResponse:
        """An admin cancelled the request mid-answer: count what was read, then end the client's answer
        the way its framing can say so (an error line, an error event and [DONE], or a cut connection)."""
        self._settle(read)
        self.outcome = Outcome.CANCELLED
        cancelled = RequestCancelled(f"the request to model {self.target.model!r} was cancelled by an admin")
        if reframe is not None:
            await response.write(reframe.failed(cancelled))
            await response.write_eof()
        elif is_sse:
            await response.write(b"data: " + json.dumps(cancelled.to_openai()).encode() + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
        elif self.request.transport is not None:  # a body cut short: only a cut connection says so
            self.request.transport.close()
        return response

    async def _break_off(self, response: web.StreamResponse, is_sse: bool, reframe: Reframe | None,
                         exc: BaseException) -> bool:
        """The model server failed mid-answer. A stream gets an error it can read (True: the caller ends it);
        a plain body's status line is gone, so the connection is cut, the only signal left (False)."""
        timed_out = isinstance(exc, asyncio.TimeoutError)
        self._cut_short(504 if timed_out else 502, Outcome.FAILED)
        if not is_sse and reframe is None:
            if self.request.transport is not None:
                self.request.transport.close()
            return False
        why = (f"sent nothing for timeouts.idle ({self.target.timeouts.idle:g}s)" if timed_out
               else f"stopped answering mid-stream: {exc or type(exc).__name__}"
               + await self.target.failure_detail())
        error = UpstreamError(f"model {self.target.model!r} {why}")
        await response.write(reframe.failed(error) if reframe is not None
                             else b"data: " + json.dumps(error.to_openai()).encode() + b"\n\n")
        return True

    def _client_left(self, tail: bytes, relayed: int, is_sse: bool) -> None:
        """The client went away before the model server's answer ended. The tokens the server reported
        are counted all the same; and a client that had the whole answer (a stream through `[DONE]`, or
        every byte of the announced length) and left before the server closed its end got an answer."""
        self.ledger.read_usage(self.record, tail, self.target.restore_hit)
        length = self.upstream.content_length
        whole = (tail.rstrip().endswith(b"data: [DONE]") if is_sse
                 else length is not None and relayed >= length)
        if whole:
            self.outcome = Outcome.ANSWERED
        else:
            self._cut_short(499, Outcome.CLIENT_GONE)

    def _cut_short(self, status: int, outcome: Outcome) -> None:
        self.record.status = status
        self.outcome = outcome
