"""Who may do what: every route's scope, keys matched by digest, a key's model globs."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from berth.config import ApiKey, parse_config
from berth.gateway.access import (
    ADMIN, ANY_KEY, INFERENCE, KEYLESS, LOGS, METRICS, ROUTE_SCOPES, KeyRing, declared_scope, may_use, model_names,
)
from berth.gateway.app import ROUTE_FAMILIES
from berth.gateway.context import GatewayContext


def routed_app() -> web.Application:
    """Every route family's routes; registering only binds handlers to the context (and notes the error shape
    of a family's routes), which is not used here."""
    app = web.Application()
    context = cast(GatewayContext, SimpleNamespace(error_shapes={}))
    for register in ROUTE_FAMILIES:
        register(app.router, context)
    return app


def test_every_route_of_the_gateway_declares_a_scope():
    undeclared = [(route.method, route.resource.canonical if route.resource else "?")
                  for route in routed_app().router.routes() if declared_scope(route.handler) not in ROUTE_SCOPES]
    assert undeclared == []


# The table README "Sharing a box" documents.
SCOPE_OF = [
    ("GET", "/health", KEYLESS), ("GET", "/ready", KEYLESS),
    ("GET", "/ui", ANY_KEY), ("GET", "/ui/", ANY_KEY), ("GET", "/ui/api/whoami", ANY_KEY),
    ("GET", "/api/usage", ANY_KEY), ("GET", "/ui/api/usage", ANY_KEY),
    ("POST", "/v1/chat/completions", INFERENCE), ("POST", "/v1/completions", INFERENCE),
    ("POST", "/v1/embeddings", INFERENCE), ("POST", "/v1/responses", INFERENCE), ("POST", "/v1/messages", INFERENCE),
    ("POST", "/completion", INFERENCE), ("POST", "/tokenize", INFERENCE), ("POST", "/v1/rerank", INFERENCE),
    ("POST", "/v1/audio/transcriptions", INFERENCE), ("POST", "/v1/images/generations", INFERENCE),
    ("POST", "/ui/api/chat/completions", INFERENCE), ("GET", "/v1/models", INFERENCE),
    ("GET", "/ui/api/models", INFERENCE), ("GET", "/models", INFERENCE), ("GET", "/props", INFERENCE),
    ("GET", "/v1/props", INFERENCE),
    ("POST", "/models/load", ADMIN), ("POST", "/models/unload", ADMIN), ("POST", "/ui/api/models/load", ADMIN),
    ("POST", "/ui/api/models/unload", ADMIN), ("POST", "/unload", ADMIN), ("POST", "/api/models/unload", ADMIN),
    ("POST", "/api/models/unload/m", ADMIN), ("GET", "/api/profiles", ADMIN), ("PUT", "/api/profiles/active", ADMIN),
    ("GET", "/upstream/m/", ADMIN), ("POST", "/upstream/m/slots/0", ADMIN),
    # the catch-all: a 404 for any key, and `admin` checked before it forwards a `?model=` path
    ("GET", "/slots", ANY_KEY), ("GET", "/lora-adapters", ANY_KEY), ("POST", "/anything/else", ANY_KEY),
    ("GET", "/logs", LOGS), ("GET", "/logs/stream", LOGS), ("GET", "/logs/stream/m", LOGS),
    ("GET", "/ui/api/logs/stream/m", LOGS), ("GET", "/api/requests", LOGS), ("GET", "/ui/api/requests", LOGS),
    ("GET", "/metrics", METRICS), ("GET", "/running", METRICS), ("GET", "/ui/api/running", METRICS),
    # Ollama's API
    ("GET", "/api/version", ANY_KEY), ("GET", "/api/tags", INFERENCE), ("GET", "/api/ps", INFERENCE),
    ("POST", "/api/show", INFERENCE), ("POST", "/api/chat", INFERENCE), ("POST", "/api/generate", INFERENCE),
    ("POST", "/api/embed", INFERENCE), ("POST", "/api/embeddings", INFERENCE),
    ("POST", "/api/pull", ADMIN), ("DELETE", "/api/delete", ADMIN),
]


@pytest.mark.parametrize(("method", "path", "expected"), SCOPE_OF)
async def test_the_scope_of_each_route(method, path, expected):
    match = await routed_app().router.resolve(make_mocked_request(method, path))
    assert declared_scope(match.route.handler) == expected


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def test_a_key_is_found_by_its_digest_and_nothing_else_matches():
    alice, bob = ApiKey("alice", digest("a-key")), ApiKey("bob", digest("b-key"))
    ring = KeyRing((alice, bob))
    assert ring.match("b-key") is bob and ring.match("a-key") is alice
    for wrong in (None, "", "a-ke", "a-key ", digest("a-key").hex(), "ключ", "\udcff"):
        assert ring.match(wrong) is None


CONFIG = """
models:
  qwen3-8b: {cmd: "server -m a.gguf --port ${PORT}", aliases: [default]}
  embed: {cmd: "server -m b.gguf --port ${PORT}", aliases: [bge]}
peers:
  cloud: {proxy: "https://example.invalid", models: [qwen-max]}
"""


def test_model_globs_match_ids_aliases_and_peer_names_but_a_local_glob_never_a_peers_model():
    config = parse_config(CONFIG)
    key = ApiKey("alice", digest("k"), models=("qwen*", "bge"))

    def allowed(name: str) -> bool:
        return may_use(key, model_names(config, name))

    assert allowed("qwen3-8b") and allowed("default")  # by id, whichever name is used
    assert allowed("embed") and allowed("bge")  # by alias
    assert not allowed("cloud/qwen-max")  # "qwen*" is not "cloud/*"
    assert may_use(ApiKey("c", digest("c"), models=("cloud/*",)), model_names(config, "cloud/qwen-max"))
    assert may_use(None, ["anything"])  # no keys configured: everything
