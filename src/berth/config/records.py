"""The typed records a config resolves into: what the rest of berth reads (through `berth.config`).

A field named as in the schema (`schema.py`) and holding a scalar is carried over as written (see
`reading.carried`); anything else is filled in by the resolution steps (`models.py`, `routing.py`,
`loader.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Collection
from typing import Any

from berth.config.schema import KEY_SCOPES
from berth.core.hosts import is_loopback
from berth.core.keyhash import key_digest

DEFAULT_GROUP = "(default)"
DEFAULT_CONCURRENCY_LIMIT = 10  # requests in flight or waiting per model, as llama-swap
PORT_MACRO = "${PORT}"  # stays in a spec until a start binds a port (`ModelSpec.with_port`)


@dataclass(frozen=True)
class UpstreamTimeouts:
    """Seconds; 0 means no limit. Defaults as llama-swap's (connect 30, responseHeader none)."""

    connect: float = 30.0
    response_header: float = 0.0
    idle: float = 0.0  # between chunks of an answer (berth's own key)
    tls_handshake: float = 10.0  # added to `connect` for https upstreams


@dataclass(frozen=True)
class Capabilities:
    """What a model accepts and produces, as declared (llama-swap's `capabilities`), for /v1/models."""

    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    tools: bool = False
    reranker: bool = False
    context: int = 0

    def empty(self) -> bool:
        return self == Capabilities()

    def reads_images(self, projector: bool | None) -> bool | None:
        """Whether the model takes images: declared (`in: [image]`) or given a projector (`--mmproj`);
        None when neither the declaration nor the launch says (another engine, a projector not pulled yet)."""
        if "image" in self.inputs or projector:
            return True
        if projector is False or self.inputs:
            return False
        return None

    def with_image_input(self) -> Capabilities:
        """These capabilities with images among the inputs (text in, text out unless declared otherwise)."""
        if "image" in self.inputs:
            return self
        return replace(self, inputs=(*(self.inputs or ("text",)), "image"), outputs=self.outputs or ("text",))


@dataclass(frozen=True)
class ModelSpec:
    """One model as berth will run it: macros expanded and argv split.

    `${PORT}` stays in argv, proxy, env and stop_argv until a start binds a port
    (`with_port`): the model's `preferred_port` when it is free then, else another
    free one, so a spec does not depend on which ports are free.
    """

    id: str
    argv: tuple[str, ...]
    stop_argv: tuple[str, ...]  # may still contain ${PID}; filled in at stop time
    proxy: str
    uses_port: bool  # argv/proxy contain ${PORT}: a port is bound at each start
    env: tuple[tuple[str, str], ...]
    check_endpoint: str | None  # None: no health check ("none")
    ttl: int  # seconds idle before unload; 0 = never
    aliases: tuple[str, ...]
    group: str
    unlisted: bool = False
    use_model_name: str = ""
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    parallel: int | None = None  # requests at its server at once; None: a llama.cpp server's -np; 0: no cap
    strip_params: tuple[str, ...] = ()
    set_params: tuple[tuple[str, Any], ...] = ()
    set_params_by_id: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # requested id -> params
    name: str = ""
    description: str = ""
    metadata: tuple[tuple[str, Any], ...] = ()
    unload_timeout: float = 10.0
    health_check_timeout: float = 120.0
    warmup: bool = False
    model_ref: str = ""  # store reference from `model:`, validated
    mmproj: bool = False
    kv_persistence: bool | None = None  # None: on when the engine is llama.cpp's
    kv_persistence_max_bytes: int = 2 * 1024**3
    kv_persistence_total_max_bytes: int = 8 * 1024**3
    declared_memory: tuple[tuple[str, int], ...] = ()  # `memory:` per device, bytes; overrides the estimate
    persistent: bool = False  # never evicted to make room by memory
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    health_check_interval: float = 10.0  # liveness checks of a ready model; 0: none
    priority: int = 0  # its waiting requests go before lower ones' (routing.scheduler...fifo.priority)
    send_loading_state: bool = False  # stream progress while a streamed chat waits for this model's start
    capabilities: Capabilities = field(default_factory=lambda: Capabilities())
    rpc: RpcSpec | None = None
    sleep_after: int = 0  # llama-server's --sleep-idle-seconds; 0: it never sleeps
    return_to: str | None = None  # the model started after this one's TTL stop when nothing waits
    port: int | None = None  # the bound port, set by `with_port` only
    # with uses_port, the port a start tries first: llama-swap's ${PORT}, startPort upwards in the order of
    # the model ids; set when the config is loaded
    preferred_port: int | None = None

    def with_port(self, port: int) -> "ModelSpec":
        """This spec with `${PORT}` replaced by `port` everywhere it may appear."""

        def bind(text: str) -> str:
            return text.replace(PORT_MACRO, str(port))

        return replace(self, argv=tuple(map(bind, self.argv)), stop_argv=tuple(map(bind, self.stop_argv)),
                       proxy=bind(self.proxy), env=tuple((k, bind(v)) for k, v in self.env), port=port)


@dataclass(frozen=True)
class GroupSpec:
    name: str
    swap: bool
    exclusive: bool
    persistent: bool
    members: tuple[str, ...]


@dataclass(frozen=True)
class RpcSpec:
    """Where a model's weights go besides this machine: agents (`host:port`, in `--rpc` order), how
    its tensors are placed over them, and per agent an explicit range of layers (placement experts)."""

    agents: tuple[str, ...]
    placement: str  # experts | layers | custom
    layer_ranges: tuple[tuple[str, int, int], ...] = ()  # (agent, first, last), inclusive
    api_key: str = ""  # the agents' key: a secret of their own, never one of the gateway's apiKeys

    def key_problem(self, model_id: str, api_key_digests: Collection[bytes]) -> str | None:
        """What is wrong with the agents' key, if anything: none for agents off this machine, or a client's key."""
        fix = (f"set models.{model_id}.rpc.apiKey to a secret of the agents' own (e.g. ${{env.BERTH_AGENT_KEY}}) "
               "and start each `berth agent` with the same --api-key")
        if not self.api_key and not all(is_loopback(agent.rpartition(":")[0]) for agent in self.agents):
            return f"not set, so agents on other machines refuse this gateway: {fix}"
        if self.api_key and key_digest(self.api_key) in api_key_digests:
            return (f"also one of apiKeys, so every client holding it can lease rpc servers on the agents and end "
                    f"this gateway's leases: {fix}")
        return None


@dataclass(frozen=True)
class PeerSpec:
    """A peer: its models answer as `<peer id>/<model>` (or the bare model when one peer alone has it)."""

    id: str
    proxy: str
    models: tuple[str, ...]
    api_key: str = ""
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    strip_params: tuple[str, ...] = ()
    set_params: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class SelectorSpec:
    """A virtual id resolved per request: `pin` the first target, `warm` the first ready (else starting,
    else the first) target, `spillover` fills targets in order up to `spillover` requests each."""

    id: str
    strategy: str
    targets: tuple[str, ...]
    spillover: int = 1
    name: str = ""
    description: str = ""
    metadata: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class ProfileSpec:
    id: str
    description: str
    pins: tuple[tuple[str, str | None], ...]  # requested id -> target; None refuses it


@dataclass(frozen=True)
class MatrixSpec:
    """The matrix's sets expanded to model ids, in definition order, and eviction costs by model id."""

    sets: tuple[frozenset[str], ...]
    evict_costs: dict[str, float]


@dataclass(frozen=True)
class KeyLimits:
    """0 is no limit."""

    requests_per_minute: int = 0
    tokens_per_day: int = 0  # prompt + completion tokens per UTC day
    concurrency: int = 0  # requests to models in flight or waiting


@dataclass(frozen=True)
class ApiKey:
    """A key clients may use: its name (in /metrics and /api/usage), the SHA-256 of the key (the key itself
    is not kept once the config is read), and what it may do."""

    name: str
    digest: bytes
    models: tuple[str, ...] = ("*",)  # globs over model ids, aliases and peer/model names
    scopes: frozenset[str] = frozenset(KEY_SCOPES)
    limits: KeyLimits = field(default_factory=KeyLimits)
    weight: int = 1  # its share of the turns among keys waiting for the same model

    def __repr__(self) -> str:  # the digest stays out of logs and tracebacks
        return f"ApiKey({self.name!r}, models={self.models}, scopes={sorted(self.scopes)}, limits={self.limits})"


@dataclass(frozen=True)
class MemorySettings:
    scheduled: bool = True  # models of the (default) group share memory instead of swapping
    budget: tuple[tuple[str, int], ...] = ()  # explicit per-device budgets; others: free at startup
    headroom_bytes: int = 1024**3
    eviction: str = "lru"


@dataclass(frozen=True)
class RemoteImages:
    """How berth treats http(s) image, audio and video URLs in requests (`remoteImages:`): it fetches them
    itself within these limits and sends the bytes inline; a model server is never given such a URL."""

    fetch: bool = True
    max_bytes: int = 10 * 1024**2  # one file
    timeout: float = 10.0  # seconds for one file, redirects included
    allow_private_addresses: bool = False  # loopback, private, link-local, shared and reserved addresses


@dataclass
class BerthConfig:
    path: str
    models: dict[str, ModelSpec]
    groups: dict[str, GroupSpec]
    matrix: MatrixSpec | None = None  # when given, it decides which models run together (no groups)
    peers: dict[str, PeerSpec] = field(default_factory=dict)
    selectors: dict[str, SelectorSpec] = field(default_factory=dict)
    profiles: dict[str, ProfileSpec] = field(default_factory=dict)
    preload: list[str] = field(default_factory=list)
    api_keys: tuple[ApiKey, ...] = ()
    allowed_hosts: list[str] = field(default_factory=list)  # "*" turns the Host check off
    allowed_origins: list[str] = field(default_factory=list)  # web pages (scheme://host[:port]) or "*" that may call
    include_aliases_in_list: bool = False
    log_level: str = "info"
    health_check_timeout: float = 120.0
    start_port: int = 5800  # each model's preferred ${PORT} counts from here; free ones are searched from here
    fallback_model: str = ""  # the model id requests naming an unknown model go to; "": they get a 404
    shutdown_timeout: float = 30.0  # on SIGTERM, seconds in-flight requests may take to finish
    client_header_timeout: float = 15.0  # seconds a client may take to send a request's headers (or stay idle)
    client_body_timeout: float = 60.0  # seconds a client may take to send a request's body
    max_connections: int = 1024  # client connections at once; more are closed at once
    max_body_bytes: int = 64 * 1024 * 1024
    unload_timeout: float = 10.0  # the models' default: SIGTERM to SIGKILL
    log_to_stdout: str = "proxy"  # proxy (berth's lines) | upstream (models' output) | both | none
    log_time_format: str | None = None  # a Go time layout name (llama-swap's); None: berth's timestamps
    log_requests: bool = False
    metrics_max_in_memory: int = 1000  # recent requests kept for the dashboard and /api/requests
    capture_bodies: bool = False  # keep the newest requests' bodies, bounded and redacted (gateway/capture.py)
    max_wait: float = 30.0  # seconds a request waits for a busy model's turn before its swap goes next
    min_residency: float = 10.0  # seconds a freshly loaded model with work keeps its turn
    upstream_ignore_paths: tuple[re.Pattern[str], ...] = ()  # /upstream paths that never load a model
    notes: list[str] = field(default_factory=list)  # informational lines for `berth check` and the log
    store_dir: Path | None = None  # None: $BERTH_HOME/models
    memory: MemorySettings = field(default_factory=lambda: MemorySettings())
    remote_images: RemoteImages = field(default_factory=lambda: RemoteImages())
    warnings: list[str] = field(default_factory=list)

    def resolve(self, name: str) -> str | None:
        """Model id for a model id or alias; None when neither."""
        if name in self.models:
            return name
        for spec in self.models.values():
            if name in spec.aliases:
                return spec.id
        return None

    def resolve_peer(self, name: str) -> tuple[PeerSpec, str] | None:
        """The peer and its model id for `<peer>/<model>`, or for a bare model id that exactly one peer
        lists; None otherwise. Local ids and aliases are looked up first, by the caller."""
        peer_id, sep, model = name.partition("/")
        if sep and peer_id in self.peers and model in self.peers[peer_id].models:
            return self.peers[peer_id], model
        offering = [peer for peer in self.peers.values() if name in peer.models]
        return (offering[0], name) if len(offering) == 1 else None

    def default_model(self) -> str | None:
        """The model a request without `model` goes to: alias `default`, else the only model, else
        `fallbackModel`."""
        by_alias = self.resolve("default")
        if by_alias:
            return by_alias
        if len(self.models) == 1:
            return next(iter(self.models))
        return self.fallback_model or None

