"""What every route family shares: the gateway's parts, reading a request's body, and the JSON shapes that
more than one family answers with."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from berth.config import BerthConfig
from berth.core.errors import (
    BadRequest, BerthError, ModelNotAllowed, RequestTimeout, ScopeNotAllowed, UnknownModel, UnsupportedMediaType,
)
from berth.gateway import origins
from berth.gateway.access import KeyRing, may_use_model, request_key
from berth.gateway.accounts import KeyAccounts
from berth.gateway.ledger import RequestLedger, RequestRecord
from berth.gateway.memory import MemoryService
from berth.gateway.metrics import Metrics
from berth.gateway.naming import Naming
from berth.gateway.pool import ModelPool
from berth.gateway.proxy import Proxy
from berth.runtime.logs import LogHub
from berth.runtime.snapshot import ModelSnapshot

log = logging.getLogger("berth.gateway")


ErrorShape = Callable[[BerthError], dict[str, Any]]  # the body an error answer has


def openai_shape(error: BerthError) -> dict[str, Any]:
    return error.to_openai()


@dataclass
class GatewayContext:
    pool: ModelPool  # models: leases, loads, unloads, snapshots
    memory: MemoryService  # plans, measurements, devices
    logs: LogHub
    ledger: RequestLedger  # every request, counted once
    proxy: Proxy  # forwarding to model servers
    accounts: KeyAccounts  # each key's limits and usage
    listen_host: str = "127.0.0.1"  # lower case, without brackets
    metrics_port: int | None = None  # `--metrics-listen`: a second socket that answers only the probes
    naming: Naming = field(default_factory=Naming)  # the active profile, selectors' requests in flight
    started_at: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # set at the first SIGTERM: /ready answers 503, new requests are refused
    # routes whose error answers take another API's shape (Ollama's), by path; others answer in OpenAI's
    error_shapes: dict[str, ErrorShape] = field(default_factory=dict)
    _keyring: KeyRing = field(default_factory=lambda: KeyRing(()))

    @property
    def config(self) -> BerthConfig:
        """The config in force now (a reload replaces it)."""
        return self.pool.config

    @property
    def metrics(self) -> Metrics:
        return self.ledger.metrics

    def keyring(self) -> KeyRing:
        """The keys of the config in force (rebuilt when a reload changes them)."""
        if self._keyring.keys is not self.config.api_keys:
            self._keyring = KeyRing(self.config.api_keys)
        return self._keyring

    def require(self, request: web.Request, needed: str) -> None:
        """403 unless the request's key has the scope `needed` (no key: berth has none, anything goes)."""
        key = request_key(request)
        if key is not None and needed not in key.scopes:
            self.accounts.refusal(key.name, "scope")
            raise ScopeNotAllowed(key.name, request.path, needed, sorted(key.scopes))

    def require_model(self, request: web.Request, model: str) -> None:
        """403 naming the model unless the request's key may use it (a local id or alias, or peer/model)."""
        key = request_key(request)
        if key is not None and not may_use_model(self.config, key, model):
            self.accounts.refusal(key.name, "model")
            raise ModelNotAllowed(key.name, model, key.models)

    @asynccontextmanager
    async def recorded(self, request: web.Request, model: str, path: str) -> AsyncIterator[RequestRecord]:
        """A request to `model` (a local id, or peer/model), counted in the ledger under the request's key
        once the key's models and limits allow it (403 or 429 otherwise, counted too). Whatever happens
        inside, the record ends once."""
        key = request_key(request)
        record = self.ledger.begin(model, path, key.name if key is not None else None)
        try:
            if key is not None:
                self.require_model(request, model)
                self.accounts.admit(key, record)
            yield record
        except (asyncio.CancelledError, ConnectionResetError):  # the client left
            if record.ended is None:
                self.ledger.abandon(record)
            raise
        except BerthError as exc:
            if record.ended is None:
                self.ledger.refused(record, exc.status)
            raise
        finally:
            if record.ended is None:  # an unexpected failure: counted all the same, never left open
                self.ledger.refused(record, 500)

    async def read_body(self, request: web.Request) -> bytes:
        """The whole body, within clientBodyTimeout: a client that trickles it in holds nothing forever."""
        try:
            async with asyncio.timeout(self.config.client_body_timeout):  # no task of its own, unlike wait_for
                return await request.read()
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within clientBodyTimeout "
                                 f"({self.config.client_body_timeout:g}s); send it faster or raise the limit") from None

    def default_or_named(self, what: str) -> str:
        """The default model, for a request that names none; a 400 naming the choices when there is none."""
        model_id = self.config.default_model()
        if model_id is None:
            raise BadRequest(f"{what}; name one of: {', '.join(self.pool.listed_ids())}")
        return model_id

    def served_by(self, name: str) -> tuple[str, bool]:
        """(the model id a request naming `name` goes to, whether that is fallbackModel standing in for a name
        no model answers to); UnknownModel, which lists the models, when fallbackModel is not set."""
        model_id = self.config.resolve(name)
        if model_id is not None:
            return model_id, False
        fallback = self.config.fallback_model
        if not fallback:
            raise UnknownModel(name, self.pool.listed_ids())
        log.info("no model is named %r: %s serves the request (fallbackModel)", name, fallback)
        return fallback, True


class Routes:
    """A route family's handlers, which find the gateway's parts in `context`."""

    def __init__(self, context: GatewayContext) -> None:
        self.context = context


JSON = "application/json"
FORM = "multipart/form-data"  # uploads


def require_body_type(request: web.Request, *accepted: str) -> None:
    """For every route that changes something (runs a model, loads, unloads), when a browser sent the request:
    its body's Content-Type is one of `accepted` (default JSON), or it sends neither body nor type; else a 415.
    A page of any site can make a browser send text/plain, form encodings or no type without asking first,
    JSON not without a preflight that berth refuses (origins.py). Programs are not held to it: llama-server,
    llama-swap and Ollama read a JSON body whatever its type, and their users' scripts send one with `curl -d`
    (a form encoding); a page cannot hide that a browser sent it (`origins.from_browser`). Uploads take
    multipart and rest on the Origin check alone."""
    if not origins.from_browser(request.headers):
        return
    kinds = accepted or (JSON,)
    if request.content_type in kinds:
        return
    if "Content-Type" not in request.headers and not request.body_exists:
        return
    raise UnsupportedMediaType(request.path, request.headers.get("Content-Type", ""), kinds)


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON ({exc}); send a JSON object") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise BadRequest("request body nests too deeply to parse; send a JSON object of ordinary depth") from None


def memory_entry(snapshot: ModelSnapshot) -> dict[str, Any]:
    """A model's `memory` in /v1/models and /running: its plan, and what its running process used."""
    plan = snapshot.plan
    entry: dict[str, Any] = {"planned_bytes": plan.planned if plan else None,
                             "source": plan.source if plan else "unknown", "detail": plan.detail if plan else ""}
    if plan is not None and plan.components is not None:  # the estimate's parts (weights, kv, ...) per device
        entry["components_bytes"] = plan.components
    if snapshot.measured is not None:
        entry["measured_bytes"] = dict(snapshot.measured)
    return entry
