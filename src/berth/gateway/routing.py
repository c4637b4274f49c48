"""Where a JSON request goes by the model its body names: the active profile's pins and selectors first,
then a local model (id or alias) or a peer's, else fallbackModel when it is set; the model's filters
(stripParams, setParams, setParamsByID, useModelName) shape the body on the way, and a local model's images
are taken (media.py: refused without a projector, remote URLs fetched). Every API berth speaks by model name
(OpenAI's, Ollama's) routes and forwards through here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from aiohttp import web

from berth.config import PeerSpec
from berth.core.errors import BadRequest
from berth.gateway import serving
from berth.gateway.access import may_use_model, request_key
from berth.gateway.context import GatewayContext
from berth.gateway.media import take_media
from berth.gateway.proxy import Outbound, Reframe
from berth.gateway.upstream import Upstream
from berth.scheduler import ModelState


@dataclass(frozen=True)
class Route:
    """One request's destination and the body to send there."""

    model: str  # a local model's id, or peer/model
    payload: dict[str, Any]  # the body, parsed: the client's, changed by the model's filters (and media)
    sent_as: bytes | None  # the client's own bytes while nothing changed the payload; None: encode it
    peer: Upstream | None = None  # None: a local model
    fallback: bool = False  # fallbackModel serves it: the request named no model berth knows

    @cached_property
    def body(self) -> bytes:
        """What goes to the model server: encoded once, however many of the steps above changed it."""
        return self.sent_as if self.sent_as is not None else json.dumps(self.payload).encode()


@contextmanager
def routed(context: GatewayContext, payload: dict[str, Any], body: bytes | None) -> Iterator[Route]:
    """The route of a request whose parsed body is `payload` (changed in place by the model's filters), sent
    as the client's `body` unless something changed it (None: always from `payload`), held for as long as
    the request runs (spillover selectors count the requests each target has)."""
    requested = payload.get("model")
    if requested is not None and not isinstance(requested, str):
        raise BadRequest("`model` must be a string")
    if not requested:
        model_id = context.default_or_named("request has no `model`")
        yield _local(context, model_id, model_id, payload, body)
        return

    def state_of(name: str) -> ModelState | None:
        model_id = context.config.resolve(name)
        return context.pool.state(model_id) if model_id is not None else None

    with context.naming.chosen(context.config, requested, state_of) as name:
        if name != requested:  # a profile's pin or a selector's choice: the request names it from here
            payload["model"] = name
            body = None
        if context.config.resolve(name) is None and (peer := context.config.resolve_peer(name)) is not None:
            yield _peer(*peer, payload)
            return
        model_id, fallback = context.served_by(name)
        if fallback:  # the model server, and so the answer's `model`, see the model that serves it
            payload["model"] = name = model_id
            body = None
        yield _local(context, model_id, name, payload, body, fallback)


def _local(context: GatewayContext, model_id: str, requested: str, payload: dict[str, Any], body: bytes | None,
           fallback: bool = False) -> Route:
    spec = context.config.models[model_id]
    by_id = dict(spec.set_params_by_id).get(requested, ())  # the setParamsByID entry of the id asked for
    if apply_filters(payload, spec.strip_params, (*spec.set_params, *by_id), spec.use_model_name):
        body = None
    return Route(model_id, payload, body, fallback=fallback)


def _peer(peer: PeerSpec, model: str, payload: dict[str, Any]) -> Route:
    """A peer's model: its filters, its model id in the body, its key in place of the client's."""
    apply_filters(payload, peer.strip_params, peer.set_params, model)
    headers = (("Authorization", f"Bearer {peer.api_key}"), ("x-api-key", peer.api_key)) if peer.api_key else ()
    target = Upstream(f"{peer.id}/{model}", peer.proxy, peer.timeouts, headers)
    return Route(target.model, payload, None, target)


async def with_media(context: GatewayContext, request: web.Request, route: Route) -> Route:
    """A local model's route with the request's images taken (media.py): refused before any load when the
    model has no projector, remote URLs fetched by berth and sent inline. A peer fetches its own. Nothing is
    taken for a model the request's key may not use: berth fetches nothing for a request it refuses (403,
    counted, when `forward` records it)."""
    if (route.peer is None and may_use_model(context.config, request_key(request), route.model)
            and await take_media(context, route.model, route.payload, len(route.body))):
        return replace(route, sent_as=None)
    return route


async def forward(context: GatewayContext, request: web.Request, route: Route, path: str,
                  reframe: Reframe | None = None, keep_alive: float | None = None) -> web.StreamResponse:
    """Send the request along its route: a local model through a lease (`keep_alive` sets its idle TTL),
    a peer's directly."""
    if route.peer is None:
        return await serving.answer(context, request, route.model, path, route.body, reframe, keep_alive)
    async with context.recorded(request, route.model, path) as record:
        return await context.proxy.answer(request, Outbound(route.peer, path, route.body), record, reframe)


def apply_filters(payload: dict[str, Any], strip: tuple[str, ...], params: tuple[tuple[str, Any], ...],
                  model: str) -> bool:
    """stripParams, then the parameters to set, then `model` (when given) into a request body, in place;
    whether anything changed. A local model's and a peer's filters mean the same."""
    changed = False
    for key in strip:
        if key in payload:
            del payload[key]
            changed = True
    for key, value in params:
        payload[key] = value
        changed = True
    if model:
        payload["model"] = model
        changed = True
    return changed
