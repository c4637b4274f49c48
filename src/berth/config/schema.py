"""The config file's shape, as written by users (llama-swap's keys, camelCase).

Validation is pydantic's; `loader.py` maps its error locations back to lines.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MacroValue = str | int | float | bool


class _Section(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", strict=False)


class FiltersConfig(_Section):
    strip_params: str | list[str] = Field("", alias="stripParams")
    legacy_strip_params: str | list[str] = Field("", alias="strip_params")  # llama-swap's earlier spelling
    set_params: dict[str, Any] = Field(default_factory=dict, alias="setParams")
    # per requested id (each id becomes an alias): variants of one loaded model without a reload
    set_params_by_id: dict[str, dict[str, Any]] = Field(default_factory=dict, alias="setParamsByID")


class CapabilitiesConfig(_Section):
    """What a model accepts and produces, shown in /v1/models (llama-swap's `capabilities`)."""

    in_: list[Literal["text", "audio", "image"]] = Field(default_factory=list, alias="in")
    out: list[Literal["text", "audio", "image"]] = Field(default_factory=list)
    tools: bool = False
    reranker: bool = False
    context: int = Field(0, ge=0)


class CompatConfig(_Section):
    # berth proxies no WebSocket upgrades, so none can load a model or count as activity: accepted as is
    ignore_websockets: bool = Field(False, alias="ignoreWebsockets")


class UpstreamConfig(_Section):
    # /upstream paths that must not load a model (409 unless it runs); llama-swap's default below
    ignore_paths: list[str] = Field(default_factory=lambda: [r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$"],
                                    alias="ignorePaths")


class TimeoutsConfig(_Section):
    """llama-swap's `timeouts` keys that berth implements (seconds; 0 = no limit), plus its own `idle`."""

    connect: float | None = Field(None, ge=0)  # TCP connect to the model server (default 30)
    response_header: float | None = Field(None, alias="responseHeader", ge=0)  # until the status line (default 0)
    idle: float | None = Field(None, ge=0)  # longest silence between chunks of an answer (default 0)
    tls_handshake: float | None = Field(None, alias="tlsHandshake", ge=0)  # https upstreams (default 10)
    # Go's transport settings in llama-swap; berth's pooling is its own (README "Coming from llama-swap")
    keepalive: float | None = Field(None, ge=0)
    idle_conn: float | None = Field(None, alias="idleConn", ge=0)


class RpcConfig(_Section):
    """A model spread over other machines through llama.cpp's RPC backend (`berth agent` on each)."""

    agents: list[str] = Field(min_length=1)  # host:port of each `berth agent --listen`
    placement: Literal["experts", "layers", "custom"] = "experts"
    layers: dict[str, str | int] = Field(default_factory=dict)  # experts only: agent -> "first-last" or one layer
    api_key: str = Field("", alias="apiKey")  # the agents' key (`berth agent --api-key`), never one of apiKeys


class ModelConfig(_Section):
    cmd: str
    cmd_stop: str = Field("", alias="cmdStop")
    proxy: str = "http://127.0.0.1:${PORT}"
    ttl: int | None = Field(None, ge=-1)  # as llama-swap: -1 (or absent) takes globalTTL, 0 never unloads
    aliases: list[str] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list)
    check_endpoint: str = Field("/health", alias="checkEndpoint")
    unlisted: bool = False
    use_model_name: str = Field("", alias="useModelName")
    concurrency_limit: int = Field(0, alias="concurrencyLimit", ge=0)  # as llama-swap: 0 is the default, 10
    # requests berth sends the server at once (the rest wait in berth, keys taking turns); None: llama.cpp's -np
    parallel: int | None = Field(None, ge=0)
    filters: FiltersConfig = Field(default_factory=lambda: FiltersConfig.model_validate({}))
    name: str = ""
    description: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    unload_timeout: float = Field(0.0, alias="unloadTimeout", ge=0)  # 0: the top-level unloadTimeout
    health_check_timeout: float | None = Field(None, alias="healthCheckTimeout", gt=0)  # default: top level's
    send_loading_state: bool | None = Field(None, alias="sendLoadingState")  # default: top level's
    capabilities: CapabilitiesConfig = Field(default_factory=lambda: CapabilitiesConfig.model_validate({}))
    compat: CompatConfig = Field(default_factory=lambda: CompatConfig.model_validate({}))
    macros: dict[str, MacroValue] = Field(default_factory=dict)
    warmup: bool = False
    model: str = ""  # a store reference (owner/repo:QUANT ...) pulled before the first start
    mmproj: bool = False  # with `model`: also pull the repo's projector and pass --mmproj
    kv_persistence: bool | None = Field(None, alias="kvPersistence")  # None: on for llama.cpp engines
    kv_persistence_max_bytes: int = Field(2 * 1024**3, alias="kvPersistenceMaxBytes", ge=0)
    memory: dict[str, str | int] = Field(default_factory=dict)  # declared need per device: {ram: 2GiB, gpu0: 6GiB}
    persistent: bool = False  # never evicted to make room by memory
    timeouts: TimeoutsConfig = Field(default_factory=lambda: TimeoutsConfig.model_validate({}))
    health_check_interval: float | None = Field(None, alias="healthCheckInterval", ge=0)
    rpc: RpcConfig | None = None
    # seconds idle before llama-server frees the model but keeps running (--sleep-idle-seconds); 0: never
    sleep_after: int = Field(0, alias="sleepAfter", ge=0)
    return_to: str | None = Field(None, alias="returnTo")  # started after this model's TTL stop; default: top level's

    @field_validator("env")
    @classmethod
    def _env_is_key_value(cls, value: list[str]) -> list[str]:
        for item in value:
            key, sep, _ = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"env entry {item!r} must look like NAME=value")
        return value


class GroupConfig(_Section):
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    members: list[str] = Field(default_factory=list)


class PeerConfig(_Section):
    """Another server with OpenAI routes (another berth or llama-swap, or a hosted API)."""

    proxy: str  # base URL; the request's path is appended
    models: list[str] = Field(min_length=1)
    api_key: str = Field("", alias="apiKey")  # sent as Authorization: Bearer and x-api-key
    timeouts: TimeoutsConfig = Field(default_factory=lambda: TimeoutsConfig.model_validate({}))
    filters: FiltersConfig = Field(default_factory=lambda: FiltersConfig.model_validate({}))


class ProfileConfig(_Section):
    """Named model id replacements, switched at run time (PUT /api/profiles/active)."""

    description: str = ""
    pins: dict[str, str | None] = Field(default_factory=dict)  # requested id -> target (None: refused, 404)

    @model_validator(mode="before")
    @classmethod
    def _not_the_old_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            raise ValueError("a profile is a mapping with description and pins (llama-swap's current form); "
                             "the old list of models that run together is a group: move it under groups:")
        return value


class SelectorSettings(_Section):
    spillover: int = Field(1, ge=1)  # requests per active target before the next target is used


class SelectorConfig(_Section):
    """A virtual model id that picks one of its targets per request."""

    strategy: Literal["warm", "pin", "spillover"]
    targets: list[str] = Field(min_length=1)
    name: str = ""
    description: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    settings: SelectorSettings = Field(default_factory=lambda: SelectorSettings.model_validate({}))


class MatrixConfig(_Section):
    """llama-swap's matrix (routing.router.settings.matrix, or the older top-level `matrix`)."""

    vars: dict[str, str] = Field(default_factory=dict)  # short name -> model id
    evict_costs: dict[str, float] = Field(default_factory=dict)  # var or model id -> cost (default 1)
    sets: dict[str, str] = Field(default_factory=dict)  # name -> expression


class RouterSettings(_Section):
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    matrix: MatrixConfig | None = None


class RouterConfig(_Section):
    use: Literal["group", "matrix"] = "group"
    settings: RouterSettings = Field(default_factory=RouterSettings)


class FifoSettings(_Section):
    priority: dict[str, int] = Field(default_factory=dict)  # model id -> priority (default 0; higher first)


class QueueSettings(_Section):
    fifo: FifoSettings = Field(default_factory=FifoSettings)


class QueueConfig(_Section):
    use: Literal["fifo"] = "fifo"
    settings: QueueSettings = Field(default_factory=QueueSettings)


class RoutingConfig(_Section):
    router: RouterConfig = Field(default_factory=RouterConfig)
    scheduler: QueueConfig = Field(default_factory=QueueConfig)


class RemoteImagesConfig(_Section):
    """Image (and audio, video) URLs in requests: berth fetches them and sends the bytes inline, so no model
    server fetches a URL a client chose."""

    fetch: bool = True  # false: requests with http(s) media URLs are refused (send base64 data URLs)
    max_bytes: str | int = Field("10MiB", alias="maxBytes")  # one file, as llama-server's own fetch limit
    timeout: float = Field(10.0, gt=0)  # seconds for one file: connecting, redirects and the body
    # loopback, private (RFC 1918, unique local), link-local (cloud metadata), shared and reserved addresses
    allow_private_addresses: bool = Field(False, alias="allowPrivateAddresses")


class MemoryConfig(_Section):
    scheduling: bool = True  # without groups, run models together while they fit (False: llama-swap's swap)
    budget: dict[str, str | int] = Field(default_factory=dict)  # per device; default: free at startup
    headroom: str | int = "1GiB"  # kept free on each device
    eviction: Literal["lru", "largest"] = "lru"


KeyScope = Literal["inference", "admin", "logs", "metrics"]
KEY_SCOPES: tuple[KeyScope, ...] = ("inference", "admin", "logs", "metrics")


class KeyLimitsConfig(_Section):
    """A key's limits; 0 (the default) is no limit."""

    requests_per_minute: int = Field(0, alias="requestsPerMinute", ge=0)
    tokens_per_day: int = Field(0, alias="tokensPerDay", ge=0)  # prompt + completion tokens per UTC day
    concurrency: int = Field(0, ge=0)  # requests to models in flight or waiting at once


class ApiKeyConfig(_Section):
    """An entry of `apiKeys`: a plain string (llama-swap's form: full access, no limits), or a named key
    with the models, scopes and limits it is allowed."""

    name: str | None  # None only for a plain string
    key: str = ""  # the key itself, usually ${env.X}
    key_hash: str = Field("", alias="keyHash")  # or its hash, as `berth key hash` prints it
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)  # globs over ids, aliases, peer/model
    scopes: list[KeyScope] = Field(default_factory=lambda: [KEY_SCOPES[0]], min_length=1)  # inference
    limits: KeyLimitsConfig = Field(default_factory=lambda: KeyLimitsConfig.model_validate({}))
    weight: int = Field(1, ge=1)  # its share of a model's turns when several keys wait for it

    @model_validator(mode="before")
    @classmethod
    def _plain_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": None, "key": value, "scopes": list(KEY_SCOPES)}
        if isinstance(value, dict) and not isinstance(value.get("name"), str):
            raise ValueError("a key written as a mapping needs a `name` (it names the key in /metrics and "
                             "/api/usage); a key written as a plain string has full access")
        return value


class StartupHooks(_Section):
    preload: list[str] = Field(default_factory=list)


class HooksConfig(_Section):
    on_startup: StartupHooks = Field(default_factory=StartupHooks)


LogTimeFormat = Literal["", "ansic", "unixdate", "rubydate", "rfc822", "rfc822z", "rfc850", "rfc1123", "rfc1123z",
                        "rfc3339", "rfc3339nano", "kitchen", "stamp", "stampmilli", "stampmicro", "stampnano"]


class BerthConfigFile(_Section):
    health_check_timeout: float = Field(120.0, alias="healthCheckTimeout", gt=0)
    unload_timeout: float = Field(10.0, alias="unloadTimeout", gt=0)  # SIGTERM to SIGKILL when a model stops
    send_loading_state: bool = Field(False, alias="sendLoadingState")
    log_to_stdout: Literal["proxy", "upstream", "both", "none"] = Field("proxy", alias="logToStdout")
    log_time_format: LogTimeFormat | None = Field(None, alias="logTimeFormat")  # None: berth's own timestamps
    log_requests: bool = Field(False, alias="logRequests")  # llama-swap's earlier key: a line per request
    metrics_max_in_memory: int = Field(1000, alias="metricsMaxInMemory", ge=1)  # recent requests kept
    capture_bodies: bool = Field(False, alias="captureBodies")  # keep recent bodies (bounded, redacted) for /ui/
    # llama-swap's own web UI settings: accepted, with a note on what berth offers instead
    capture_buffer: int = Field(10, alias="captureBuffer", ge=0)
    ui: dict[str, Any] = Field(default_factory=dict)
    performance: dict[str, Any] = Field(default_factory=dict)
    upstream: UpstreamConfig = Field(default_factory=lambda: UpstreamConfig.model_validate({}))
    shutdown_timeout: float = Field(30.0, alias="shutdownTimeout", ge=0)  # seconds in-flight requests may finish
    timeouts: TimeoutsConfig = Field(default_factory=lambda: TimeoutsConfig.model_validate({}))
    client_header_timeout: float = Field(15.0, alias="clientHeaderTimeout", gt=0)  # a request's headers, and idle
    client_body_timeout: float = Field(60.0, alias="clientBodyTimeout", gt=0)  # a request's whole body
    max_connections: int = Field(1024, alias="maxConnections", ge=1)  # client connections open at once
    # seconds between liveness checks of ready models (0: none); three missed in a row restart the model
    health_check_interval: float = Field(10.0, alias="healthCheckInterval", ge=0)
    global_ttl: int = Field(0, alias="globalTTL", ge=0)
    # batching (README "Whose turn"): seconds a request may wait for a busy model's turn to end, and
    # seconds a freshly loaded model with work keeps its turn; both 0: plain arrival order
    max_wait: float = Field(30.0, alias="maxWait", ge=0)
    min_residency: float = Field(10.0, alias="minResidency", ge=0)
    return_to: str | None = Field(None, alias="returnTo")  # the model to start after any other's TTL stop
    start_port: int = Field(5800, alias="startPort", ge=1, le=65535)
    fallback_model: str = Field("", alias="fallbackModel")  # berth's: where requests for unknown models go
    log_level: str = Field("info", alias="logLevel")
    macros: dict[str, MacroValue] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    groups: dict[str, GroupConfig] = Field(default_factory=dict)  # llama-swap's legacy place for groups
    matrix: MatrixConfig | None = None  # llama-swap's earlier place for the matrix
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    peers: dict[str, PeerConfig] = Field(default_factory=dict)
    profiles: dict[str, ProfileConfig] = Field(default_factory=dict)
    selectors: dict[str, SelectorConfig] = Field(default_factory=dict)
    hooks: HooksConfig = Field(default_factory=HooksConfig)
    api_keys: list[ApiKeyConfig] = Field(default_factory=list, alias="apiKeys")
    allowed_hosts: list[str] = Field(default_factory=list, alias="allowedHosts")  # Host names besides localhost
    allowed_origins: list[str] = Field(default_factory=list, alias="allowedOrigins")  # browser pages allowed in
    include_aliases_in_list: bool = Field(False, alias="includeAliasesInList")
    max_body_bytes: int = Field(64 * 1024 * 1024, alias="maxBodyBytes", gt=0)
    model_store: str = Field("", alias="modelStore")  # default: $BERTH_HOME/models
    kv_persistence_total_max_bytes: int = Field(8 * 1024**3, alias="kvPersistenceTotalMaxBytes", ge=0)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    remote_images: RemoteImagesConfig = Field(default_factory=lambda: RemoteImagesConfig.model_validate({}),
                                              alias="remoteImages")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warn", "warning", "error"}:
            raise ValueError("logLevel must be one of debug, info, warn, error")
        return value.lower()


def known_keys(section: type[BaseModel]) -> set[str]:
    """The keys a user may write in a section (aliases, or field names without one)."""
    return {field.alias or name for name, field in section.model_fields.items()}
