"""llama-swap's sendLoadingState: a streamed chat for a model that is not ready yet is answered at once;
the model's start is reported in `reasoning_content` deltas (which chat UIs show as thinking) until it is
ready, then the model's own answer follows in the same response."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from berth.core.errors import BerthError
from berth.gateway.context import GatewayContext
from berth.gateway.ledger import RequestRecord
from berth.gateway.pool import Lease
from berth.gateway.proxy import Outbound
from berth.gateway.serving import client_of
from berth.scheduler import Client

LOADING_STATE_INTERVAL = 1.0  # seconds between progress deltas while a model loads


async def serve_while_loading(context: GatewayContext, request: web.Request, model_id: str, path: str,
                              body: bytes) -> web.StreamResponse:
    async with context.recorded(request, model_id, path) as record:  # a key's refusal is still a plain 403/429
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        lease = await _wait_reporting(context, response, model_id, record, client_of(request))
        if lease is None:
            return response
        try:
            await response.write(_loading_chunk(model_id, f"\nberth: {model_id} is ready "
                                                           f"({time.perf_counter() - record.began:.1f}s)\n\n"))
            return await context.proxy.continue_stream(request, Outbound(lease.upstream(), path, body), record,
                                                       response)
        finally:
            lease.release()


async def _wait_reporting(context: GatewayContext, response: web.StreamResponse, model_id: str,
                          record: RequestRecord, client: Client) -> Lease | None:
    """A lease on the model, with progress deltas while it loads; None when it was refused (the error went
    to the client as an event)."""
    acquiring = asyncio.ensure_future(context.pool.acquire(model_id, client))
    lease: Lease | None = None
    try:
        note = f"berth: loading {model_id}"
        while True:
            await response.write(_loading_chunk(model_id, note))
            done, _ = await asyncio.wait({acquiring}, timeout=LOADING_STATE_INTERVAL)
            if done:
                break
            note = f" … {time.perf_counter() - record.began:.0f}s"
        lease = acquiring.result()
    except BerthError as exc:
        context.ledger.refused(record, exc.status)
        await response.write(b"data: " + json.dumps(exc.to_openai()).encode() + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return None
    finally:
        if lease is None:  # the client left while it loaded
            if not acquiring.done():
                acquiring.cancel()  # gives up its place in the queue
            elif not acquiring.cancelled() and acquiring.exception() is None:
                acquiring.result().release()  # admitted in the same instant: give the slot back
    return lease


def _loading_chunk(model_id: str, text: str) -> bytes:
    chunk = {"id": "chatcmpl-berth-loading", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model_id, "choices": [{"index": 0, "delta": {"reasoning_content": text},
                                             "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"
