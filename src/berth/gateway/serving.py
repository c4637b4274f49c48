"""Serving one request on a local model: wait for a lease, forward, give the lease back; the request is
counted in the ledger whether it was refused or answered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from berth.gateway.context import GatewayContext
from berth.gateway.ledger import RequestRecord
from berth.gateway.pool import Lease
from berth.gateway.proxy import Outbound, Reframe


@asynccontextmanager
async def leased(context: GatewayContext, request: web.Request, model_id: str,
                 path: str) -> AsyncIterator[tuple[Lease, RequestRecord]]:
    """The request's record (see `GatewayContext.recorded`: the key's models and limits) and a lease on
    `model_id` (raises the typed error when refused, counted as refused); the lease is given back when the
    block ends."""
    async with context.recorded(request, model_id, path) as record:
        lease = await context.pool.acquire(model_id)
        try:
            yield lease, record
        finally:
            lease.release()


async def answer(context: GatewayContext, request: web.Request, model_id: str, path: str,
                 body: bytes | None, reframe: Reframe | None = None,
                 keep_alive: float | None = None) -> web.StreamResponse:
    """The model's answer, error answers in OpenAI's shape (or what `reframe` makes of them). `keep_alive`
    (a client's idle TTL for the model, see ModelPool.keep_alive) is set once the request is admitted, so
    that a `0` stops the model after this answer rather than before it."""
    async with leased(context, request, model_id, path) as (lease, record):
        if keep_alive is not None:
            context.pool.keep_alive(model_id, keep_alive)
        return await context.proxy.answer(request, Outbound(lease.upstream(), path, body), record, reframe)


async def pass_through(context: GatewayContext, request: web.Request, model_id: str, path: str,
                       body: bytes | None) -> web.StreamResponse:
    """The model server's answer as it sent it (its own UI and API)."""
    async with leased(context, request, model_id, path) as (lease, record):
        return await context.proxy.pass_through(request, Outbound(lease.upstream(), path, body), record)
