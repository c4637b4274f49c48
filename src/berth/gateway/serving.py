"""Serving one request on a local model: wait for a lease, forward, give the lease back; the request is
counted in the ledger whether it was refused or answered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from berth.gateway.access import request_key
from berth.gateway.context import GatewayContext
from berth.gateway.ledger import RequestRecord
from berth.gateway.pool import Lease
from berth.gateway.proxy import Outbound, Reframe
from berth.scheduler import Client

# Inference paths that do not occupy one of a llama.cpp server's slots (it answers them beside its slots' work).
SLOTLESS_PATHS = frozenset({"/tokenize", "/detokenize", "/apply-template", "/v1/messages/count_tokens"})


def client_of(request: web.Request) -> Client:
    """Whom a request takes turns as: its API key (all requests without one are one client)."""
    key = request_key(request)
    return Client(key.name, key.weight) if key is not None else Client()


@asynccontextmanager
async def leased(context: GatewayContext, request: web.Request, model_id: str, path: str,
                 uses_slot: bool = True) -> AsyncIterator[tuple[Lease, RequestRecord]]:
    """The request's record (see `GatewayContext.recorded`: the key's models and limits) and a lease on
    `model_id` (raises the typed error when refused, counted as refused), taken in the key's turn; the lease
    is given back when the block ends. `uses_slot`: the request takes one of the server's `parallel` slots."""
    async with context.recorded(request, model_id, path) as record:
        lease = await context.pool.acquire(model_id, client_of(request), uses_slot)
        try:
            yield lease, record
        finally:
            lease.release()


async def answer(context: GatewayContext, request: web.Request, model_id: str, path: str,
                 body: bytes | None, reframe: Reframe | None = None, keep_alive: float | None = None,
                 uses_slot: bool | None = None) -> web.StreamResponse:
    """The model's answer, error answers in OpenAI's shape (or what `reframe` makes of them). `keep_alive`
    (a client's idle TTL for the model, see ModelPool.keep_alive) is set once the request is admitted, so
    that a `0` stops the model after this answer rather than before it. Unless told, a request takes a slot
    of the server unless its path only reads the model (tokenizing, templates)."""
    uses_slot = path not in SLOTLESS_PATHS if uses_slot is None else uses_slot
    async with leased(context, request, model_id, path, uses_slot) as (lease, record):
        if keep_alive is not None:
            context.pool.keep_alive(model_id, keep_alive)
        return await context.proxy.answer(request, Outbound(lease.upstream(), path, body), record, reframe)


async def pass_through(context: GatewayContext, request: web.Request, model_id: str, path: str,
                       body: bytes | None) -> web.StreamResponse:
    """The model server's answer as it sent it (its own UI and API); it takes none of the server's slots."""
    async with leased(context, request, model_id, path, uses_slot=False) as (lease, record):
        return await context.proxy.pass_through(request, Outbound(lease.upstream(), path, body), record)
