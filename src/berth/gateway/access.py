"""Who may do what: API keys matched in constant time, each route's scope, and a key's models.

Every handler declares its scope with `@scope(...)`; the auth middleware reads it from the matched
route, so a route family (a new one included) is covered by declaring its handlers, not by a list of
paths kept elsewhere. A handler that declares nothing needs `admin` (closed by default), and
tests/unit/test_access.py checks that every route berth registers declares one.

    KEYLESS     no key at all (probes)
    ANY_KEY     any valid key (the dashboard's page, what a key may do, its own usage)
    inference   the models: OpenAI and llama-server inference routes, model lists
    admin       load, unload, profiles, a model server's own UI and raw API
    logs        the logs and the recent requests (prompts and who sent what)
    metrics     /metrics and /running
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from aiohttp import web

from berth.config import KEY_SCOPES, ApiKey, BerthConfig
from berth.core.credentials import same_secret
from berth.core.keyhash import key_digest

INFERENCE, ADMIN, LOGS, METRICS = KEY_SCOPES
KEYLESS = "keyless"
ANY_KEY = "any key"
ROUTE_SCOPES = (KEYLESS, ANY_KEY, *KEY_SCOPES)
_SCOPE_ATTRIBUTE = "berth_scope"
_KEY = "berth.key"  # where the auth middleware leaves the request's key

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


def scope(name: str) -> Callable[[H], H]:
    """Declare the scope a handler needs (one of ROUTE_SCOPES)."""
    if name not in ROUTE_SCOPES:
        raise ValueError(f"unknown scope {name!r}")

    def declare(handler: H) -> H:
        setattr(handler, _SCOPE_ATTRIBUTE, name)
        return handler

    return declare


def declared_scope(handler: Any) -> str | None:
    """The scope a handler (a function, a bound method, or a partial of either) declared, if any."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    found = getattr(handler, _SCOPE_ATTRIBUTE, None)
    return found if isinstance(found, str) else None


def route_scope(request: web.Request) -> str | None:
    """The scope of the route a request matched; None when it matched none (aiohttp answers 404 or 405)."""
    match_info = request.match_info
    if match_info.http_exception is not None:
        return None
    return declared_scope(match_info.route.handler) or ADMIN


class KeyRing:
    """The config's keys, matched by digest. Every key is compared, in constant time, so the time taken
    says nothing about which key nearly matched."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self.keys = keys

    def match(self, presented: str | None) -> ApiKey | None:
        digest = key_digest(presented) if presented is not None else b""
        found: ApiKey | None = None
        for key in self.keys:
            if same_secret(digest, key.digest) and presented is not None:
                found = key
        return found


def remember_key(request: web.Request, key: ApiKey) -> None:
    request[_KEY] = key


def request_key(request: web.Request) -> ApiKey | None:
    """The key a request came with; None when berth has no keys (or for the keyless probes)."""
    key = request.get(_KEY)
    return key if isinstance(key, ApiKey) else None


def may_use(key: ApiKey | None, names: Iterable[str]) -> bool:
    """Whether a key's model globs match one of a model's names (no key: anything goes)."""
    if key is None:
        return True
    names = list(names)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in key.models for name in names)


def may_use_model(config: BerthConfig, key: ApiKey | None, model: str) -> bool:
    """Whether a key may use the model a name stands for (a local model's id or alias, or peer/model)."""
    return may_use(key, model_names(config, model))


def model_names(config: BerthConfig, model: str) -> tuple[str, ...]:
    """The names a key's globs are matched against: a local model's id and aliases (given either), else the
    name itself (a peer's model as peer/model, so a glob for local models never lets a peer's through)."""
    model_id = config.resolve(model)
    if model_id is None:
        return (model,)
    spec = config.models[model_id]
    return (spec.id, *spec.aliases)
