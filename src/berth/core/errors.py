"""Typed errors. Raised anywhere, rendered once at the edge (HTTP or CLI)."""

from __future__ import annotations

import re
from typing import Any

from berth.core.units import format_bytes


class BerthError(Exception):
    """Base error: carries the HTTP status and OpenAI error type it renders as."""

    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code or self.error_type}}


class ConfigError(BerthError):
    """A config file that cannot be used: names the file, line and key."""

    status = 500
    error_type = "config_error"

    def __init__(self, path: str, line: int | None, key: str, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.path, self.line, self.key, self.reason = path, line, key, message


class BadRequest(BerthError):
    status = 400
    error_type = "invalid_request_error"


class FlagsNotAccepted(BadRequest):
    """A cmd with flags the installed engine does not take: it would exit as soon as it started."""

    code = "flags_not_accepted"

    def __init__(self, model: str, binary: str, problems: list[str]) -> None:
        super().__init__(f"{model}: {binary} does not take " + "; ".join(problems) + "; fix `cmd` in the config")
        self.model, self.problems = model, problems


class MediaNotSupported(BadRequest):
    """Images (or audio, video) for a model whose server has no multimodal projector: refused before any load."""

    code = "model_not_multimodal"

    def __init__(self, model: str, kinds: list[str]) -> None:
        super().__init__(
            f"model {model!r} cannot read {' or '.join(kinds)}: it has no multimodal projector. Send them to a "
            "model that lists `capabilities.vision` in GET /v1/models, or give this one its projector: "
            "--mmproj FILE in its cmd, or `mmproj: true` beside `model: owner/repo:QUANT`")
        self.model = model


class MediaUrlRefused(BadRequest):
    """A media URL berth will not fetch (its scheme, its address, or remote fetching turned off)."""

    code = "media_url_not_allowed"


class MediaUrlFailed(BadRequest):
    """A media URL berth tried and failed to fetch within remoteImages' limits."""

    code = "invalid_image_url"


class Unauthorized(BerthError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ModelNotAllowed(BerthError):
    status = 403
    error_type = "permission_error"
    code = "model_not_allowed"

    def __init__(self, key: str, model: str, allowed: tuple[str, ...]) -> None:
        super().__init__(f"the API key {key!r} may not use model {model!r} (its models: {', '.join(allowed)}); "
                         "ask for one of those, or ask the operator to add it to the key's models")
        self.model = model


class ScopeNotAllowed(BerthError):
    status = 403
    error_type = "permission_error"
    code = "scope_not_allowed"

    def __init__(self, key: str, path: str, needed: str, scopes: list[str]) -> None:
        super().__init__(f"the API key {key!r} may not use {path}: it needs the scope {needed!r}, and the key has "
                         f"{', '.join(scopes)}; use a key with that scope")


class KeyLimitReached(BerthError):
    """A key's requestsPerMinute, tokensPerDay or concurrency is used up for now."""

    status = 429
    error_type = "rate_limit_error"

    def __init__(self, key: str, limit: str, value: int, retry_after: int, detail: str) -> None:
        super().__init__(f"the API key {key!r} reached its {limit} limit ({value}): {detail}; retry after "
                         f"{retry_after}s")
        self.code = "key_" + re.sub(r"(?<!^)(?=[A-Z])", "_", limit).lower()  # requestsPerMinute: key_requests_per_minute
        self.limit, self.retry_after = limit, retry_after


class UnknownModel(BerthError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(f"model {model!r} is not configured; available models: {', '.join(available) or '(none)'}")
        self.model, self.available = model, list(available)


class HostNotAllowed(BerthError):
    status = 403
    error_type = "permission_error"
    code = "host_not_allowed"

    def __init__(self, host: str) -> None:
        super().__init__(
            f"berth does not answer to the Host {host!r}: a web page can reach a server on this machine through "
            "a domain name of its own (DNS rebinding), so only localhost names, the listen address and (on a "
            "network address) IP addresses are accepted. If you reach berth under this name, add it to "
            "allowedHosts in the config")


class OriginNotAllowed(BerthError):
    """A request a browser sent for a page of another origin, which allowedOrigins does not list."""

    status = 403
    error_type = "permission_error"
    code = "origin_not_allowed"

    def __init__(self, origin: str | None) -> None:
        page = f"a page of {origin}" if origin else "a page of another site"
        super().__init__(
            f"berth does not answer requests that {page} makes a browser send: any web page could otherwise "
            "use, load and unload models through the visitor's browser. If that page is yours, add its origin "
            "(scheme://host[:port]) to allowedOrigins in the config")


class MethodNotAllowed(BerthError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, method: str, path: str, allowed: list[str]) -> None:
        super().__init__(f"{path} does not take {method}; use {' or '.join(allowed)}")
        self.allowed = allowed


class UnsupportedMediaType(BerthError):
    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"

    def __init__(self, path: str, sent: str, accepted: tuple[str, ...]) -> None:
        took = " or ".join(f"Content-Type: {kind}" for kind in accepted)
        super().__init__(
            f"from a browser, {path} takes a body with {took}, not {sent or 'a body without Content-Type'}; "
            "send that header from the page. Other types are refused from browsers because any web page can "
            "make a browser send them")


class ForeignHost(BerthError):
    """A request under a Host name a keyless server does not answer to (DNS rebinding)."""

    status = 403
    error_type = "permission_error"
    code = "host_not_allowed"


class NotJson(BerthError):
    """A state-changing request whose body is not JSON (what a web page can send without asking)."""

    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class NotTheLessee(BerthError):
    """An rpc lease renewed or ended from an address other than the one that took it."""

    status = 403
    error_type = "permission_error"
    code = "not_the_lessee"


class LeaseNotFound(BerthError):
    status = 404
    error_type = "invalid_request_error"
    code = "lease_not_found"


class LeaseLimit(BerthError):
    """An agent that already lends as many rpc servers as it may (in all, or to one address)."""

    status = 429
    error_type = "rate_limit_error"
    code = "lease_limit"


class RequestTimeout(BerthError):
    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class BodyTooLarge(BerthError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class TooManyRequests(BerthError):
    status = 429
    error_type = "rate_limit_error"
    code = "concurrency_limit"

    def __init__(self, model: str, limit: int, retry_after: int = 1) -> None:
        super().__init__(
            f"model {model!r} already has {limit} requests in flight or waiting (concurrencyLimit {limit}); "
            f"retry after {retry_after}s or raise concurrencyLimit in the config"
        )
        self.retry_after = retry_after


class StartFailed(BerthError):
    """A model process that never became ready; carries its last log lines."""

    status = 503
    error_type = "server_error"
    code = "model_start_failed"

    def __init__(self, model: str, reason: str, last_log_lines: list[str] | None = None,
                 out_of_memory: bool = False) -> None:
        self.model, self.reason = model, reason
        self.out_of_memory = out_of_memory  # the scheduler evicts idle models and retries once
        self.last_log_lines = list(last_log_lines or [])
        tail = "\n".join(self.last_log_lines[-15:])
        super().__init__(f"model {model!r} failed to start: {reason}" + (f"\nlast log lines:\n{tail}" if tail else ""))


class InsufficientMemory(BerthError):
    """A model whose planned memory cannot fit, even with every other evictable model stopped."""

    status = 507
    error_type = "server_error"
    code = "insufficient_memory"

    def __init__(self, model: str, need: dict[str, int], available: dict[str, int], held: str = "") -> None:
        short = [d for d in sorted(need) if need[d] > available.get(d, 0)]
        plan = "; ".join(f"{d}: needs {format_bytes(need[d])}, at most {format_bytes(available.get(d, 0))} "
                         "can be freed" for d in short)
        super().__init__(
            f"model {model!r} does not fit in memory ({plan}){held}; lower its context (-c), --parallel or "
            "-ngl (`berth fit` shows what fits), or raise memoryBudget in the config"
        )
        self.model, self.need, self.available = model, dict(need), dict(available)


class ModelUnloaded(BerthError):
    status = 503
    error_type = "server_error"
    code = "model_unloaded"

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r} was stopped before it could serve this request ({reason}); retry")


class StartBackedOff(BerthError):
    """Refused without a start: the model failed to start several times in a row and berth waits."""

    status = 503
    error_type = "server_error"
    code = "model_start_backoff"

    def __init__(self, model: str, failures: int, retry_in: float, last_error: BerthError | None) -> None:
        last = last_error.message.splitlines()[0] if last_error is not None else "unknown"
        super().__init__(
            f"model {model!r} failed to start {failures} times in a row; berth tries again in {retry_in:.0f}s "
            f"(last failure: {last}). Fix the cause (its log: /logs?model={model}) or change its config, "
            "which allows a new try at once")
        self.retry_after = max(1, int(retry_in + 0.999))


class UpstreamError(BerthError):
    status = 502
    error_type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(BerthError):
    status = 504
    error_type = "server_error"
    code = "upstream_timeout"


class ShuttingDown(BerthError):
    status = 503
    error_type = "server_error"
    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("berth is shutting down; retry against another instance")


class RouteNotFound(BerthError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"

    def __init__(self, path: str) -> None:
        super().__init__(f"no route for {path}; see /v1/models for the models and the OpenAI paths berth serves")


class ModelNotLoaded(BerthError):
    status = 409
    error_type = "invalid_request_error"
    code = "model_not_loaded"

    def __init__(self, model: str, path: str) -> None:
        super().__init__(f"model {model!r} is not loaded, and {path} matches upstream.ignorePaths, so it does not "
                         "load it; load the model first (any request to it), or change upstream.ignorePaths")


class PinnedOff(BerthError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, profile: str) -> None:
        super().__init__(f"model {model!r} is turned off by the active profile {profile!r}; switch profiles "
                         "(PUT /api/profiles/active) or ask for another model")


class ProfileNotFound(BerthError):
    status = 404
    error_type = "invalid_request_error"
    code = "profile_not_found"

    def __init__(self, name: str, known: list[str]) -> None:
        names = ", ".join(known) or "none are configured"
        super().__init__(f"profile {name!r} not found; profiles: {names} (or null for none)")


class RequestCancelled(BerthError):
    """The error event that ends a streamed answer an admin cancelled."""

    status = 499
    error_type = "request_cancelled"


class RequestNotFound(BerthError):
    status = 404
    error_type = "not_found_error"
    code = "request_not_found"

    def __init__(self, request_id: str) -> None:
        super().__init__(f"no request {request_id} among those in flight or recent; "
                         "GET /api/requests lists them with their ids")


class RequestNotCancellable(BerthError):
    status = 409
    error_type = "invalid_request_error"
    code = "request_not_cancellable"

    def __init__(self, request_id: int, ended: bool) -> None:
        why = ("it has ended already" if ended else
               "its answer has not begun (it waits for its model, or is not a forwarded request); try again once "
               "it streams")
        super().__init__(f"request {request_id} cannot be cancelled: {why}")
