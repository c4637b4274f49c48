"""Load a llama-swap style config into resolved, typed model specs.

Everything a user can get wrong is reported as ConfigError(path, line, key,
message); keys berth does not implement become warnings with their line.
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from berth.config import schema
from berth.config.cmdline import CommandSyntaxError, split_command
from berth.config.matrix import MatrixSyntaxError, expand as expand_sets
from berth.config.yamlines import LineDict, load_yaml
from berth.core.errors import ConfigError
from berth.core.units import SizeError, device_key, parse_size
from berth.core.refs import BadModelRef, parse_ref

DEFAULT_GROUP = "(default)"
DEFAULT_CONCURRENCY_LIMIT = 10  # requests in flight or waiting per model, as llama-swap
_MACRO_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_MACRO_REF = re.compile(r"\$\{([^}]*)\}")
_RESERVED_MACROS = {"PORT", "MODEL_ID", "PID"}
_MAX_MACRO_DEPTH = 10
_MATRIX_VAR = re.compile(r"^[A-Za-z0-9.-]{1,32}$")


PORT_MACRO = "${PORT}"


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


@dataclass(frozen=True)
class ModelSpec:
    """One model as berth will run it: macros expanded and argv split.

    `${PORT}` stays in argv, proxy, env and stop_argv until a start binds a free
    port (`with_port`), so a spec does not depend on which ports are free or on
    the order of models in the file.
    """

    id: str
    argv: tuple[str, ...]
    stop_argv: tuple[str, ...]  # may still contain ${PID}; filled in at stop time
    proxy: str
    uses_port: bool  # argv/proxy contain ${PORT}: a free port is chosen at each start
    env: tuple[tuple[str, str], ...]
    check_endpoint: str | None  # None: no health check ("none")
    ttl: int  # seconds idle before unload; 0 = never
    aliases: tuple[str, ...]
    group: str
    unlisted: bool = False
    use_model_name: str = ""
    concurrency_limit: int = 10
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
    port: int | None = None  # the bound port, set by `with_port` only

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
    api_key: str = ""


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
class MemorySettings:
    scheduled: bool = True  # models of the (default) group share memory instead of swapping
    budget: tuple[tuple[str, int], ...] = ()  # explicit per-device budgets; others: free at startup
    headroom_bytes: int = 1024**3
    eviction: str = "lru"


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
    api_keys: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)  # "*" turns the Host check off
    include_aliases_in_list: bool = False
    log_level: str = "info"
    health_check_timeout: float = 120.0
    start_port: int = 5800  # free ports for ${PORT} are searched from here at each start
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
    upstream_ignore_paths: tuple[re.Pattern[str], ...] = ()  # /upstream paths that never load a model
    notes: list[str] = field(default_factory=list)  # informational lines for `berth check` and the log
    store_dir: Path | None = None  # None: $BERTH_HOME/models
    memory: MemorySettings = field(default_factory=lambda: MemorySettings())
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
        """The model a request without `model` goes to: alias `default`, else the only model."""
        by_alias = self.resolve("default")
        if by_alias:
            return by_alias
        if len(self.models) == 1:
            return next(iter(self.models))
        return None


def load_config(path: str | os.PathLike[str]) -> BerthConfig:
    path_str = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path_str, None, "", "file not found; pass an existing file with -c/--config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path_str, None, "", f"cannot read file: {exc}") from None
    return parse_config(text, path_str)


def parse_config(text: str, path: str = "<config>", environ: dict[str, str] | None = None) -> BerthConfig:
    raw = load_yaml(text, path)
    if raw is None:
        raw = LineDict()
        raw.key_lines, raw.line = {}, 1
    if not isinstance(raw, LineDict):
        raise ConfigError(path, 1, "", "the top level must be a mapping with a `models:` key")
    warnings: list[str] = []
    _collect_unknown_keys(raw, path, warnings)
    try:
        parsed = schema.BerthConfigFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(str(part) for part in first["loc"])
        raise ConfigError(path, _line_of(raw, loc), ".".join(loc), first["msg"]) from None
    return _Resolver(parsed, raw, path, environ if environ is not None else dict(os.environ), warnings).resolve()


# -- unknown keys ---------------------------------------------------------------


def _sections(annotation: Any) -> tuple[bool, type[BaseModel]] | None:
    """For a field's type: (whether it maps names to sections, the section type), or None when the
    field holds no section (`X`, `X | None` and `dict[str, X]` hold one)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return False, annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and len(args) == 2:
        inner = _sections(args[1])
        return (True, inner[1]) if inner is not None and not inner[0] else None
    for arg in args:  # a union: X | None
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return False, arg
    return None


def _collect_unknown_keys(raw: LineDict, path: str, warnings: list[str]) -> None:
    """Keys the schema does not have, at any depth, each warned with its line (the schema's sections
    are walked, so a new section is covered without a line here)."""
    found: list[tuple[int, str]] = []

    def check(node: Any, section: type[BaseModel], where: str) -> None:
        if not isinstance(node, LineDict):
            return
        fields = {field.alias or name: field for name, field in section.model_fields.items()}
        for key, value in node.items():
            dotted = f"{where}.{key}" if where else key
            field = fields.get(key)
            if field is None:
                line = node.line_of(key)
                found.append((line, f"{path}:{line}: {dotted}: not supported by berth; ignored"))
                continue
            inner = _sections(field.annotation)
            if inner is None:
                continue
            named, shape = inner
            if not named:
                check(value, shape, dotted)
            elif isinstance(value, LineDict):
                for name, entry in value.items():
                    check(entry, shape, f"{dotted}.{name}")

    check(raw, schema.BerthConfigFile, "")
    warnings.extend(text for _, text in sorted(found))


def _line_of(raw: Any, loc: tuple[str, ...]) -> int | None:
    """Deepest known line along a key path."""
    line = raw.line if isinstance(raw, LineDict) else None
    node = raw
    for key in loc:
        if isinstance(node, LineDict) and key in node:
            line = node.line_of(key)
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            break
    return line


# -- resolution -----------------------------------------------------------------


def _param_names(given: str | list[str]) -> tuple[str, ...]:
    """stripParams as names: a comma-separated string or a list; never `model` (it stays)."""
    names = given.split(",") if isinstance(given, str) else given
    return tuple(n.strip() for n in names if n.strip() and n.strip() != "model")


def _macro_text(value: schema.MacroValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Resolver:
    def __init__(self, parsed: schema.BerthConfigFile, raw: LineDict, path: str,
                 environ: dict[str, str], warnings: list[str]) -> None:
        self.parsed, self.raw, self.path, self.environ, self.warnings = parsed, raw, path, environ, warnings
        self.left_out: list[tuple[int, str]] = []  # (line, warning) for references to undefined models

    def error(self, loc: tuple[str, ...], message: str) -> ConfigError:
        return ConfigError(self.path, _line_of(self.raw, loc), ".".join(loc), message)

    def resolve(self) -> BerthConfig:
        p = self.parsed
        self.check_macro_names(p.macros, ("macros",))
        self.groups, self.groups_loc, matrix = self.routing()
        for name in p.routing.scheduler.settings.fifo.priority:
            if name not in p.models:
                self.dangling(("routing", "scheduler", "settings", "fifo", "priority", name), name, "its priority")
        group_of = self.resolve_group_membership()
        models = {model_id: self.resolve_model(model_id, model, group_of[model_id])
                  for model_id, model in p.models.items()}
        self.check_aliases(models)
        config = BerthConfig(
            path=self.path,
            models=models,
            groups=self.resolve_groups(group_of),
            matrix=self.resolve_matrix(*matrix) if matrix else None,
            peers={peer_id: self.resolve_peer(peer_id, peer) for peer_id, peer in p.peers.items()},
            selectors={sid: SelectorSpec(sid, sel.strategy, tuple(sel.targets), sel.settings.spillover,
                                         sel.name, sel.description, tuple(sel.metadata.items()))
                       for sid, sel in p.selectors.items()},
            profiles={pid: ProfileSpec(pid, prof.description, tuple((k, v or None) for k, v in prof.pins.items()))
                      for pid, prof in p.profiles.items()},
            api_keys=[self.expand_env(k, ("apiKeys", str(i))) for i, k in enumerate(p.api_keys)],
            allowed_hosts=[h.strip().lower() for h in p.allowed_hosts],
            include_aliases_in_list=p.include_aliases_in_list,
            log_level=p.log_level,
            health_check_timeout=p.health_check_timeout,
            start_port=p.start_port,
            shutdown_timeout=p.shutdown_timeout,
            client_header_timeout=p.client_header_timeout,
            client_body_timeout=p.client_body_timeout,
            max_connections=p.max_connections,
            max_body_bytes=p.max_body_bytes,
            store_dir=Path(os.path.expanduser(self.expand_env(p.model_store, ("modelStore",)))) if p.model_store
            else None,
            memory=self.memory_settings(),
            warnings=self.warnings,
            unload_timeout=p.unload_timeout,
            log_to_stdout=p.log_to_stdout,
            log_time_format=p.log_time_format or None,
            log_requests=p.log_requests,
            metrics_max_in_memory=p.metrics_max_in_memory,
            upstream_ignore_paths=self.ignore_paths(p.upstream.ignore_paths),
            notes=self.web_ui_notes(),
        )
        self.check_virtual_ids(config)
        for i, key in enumerate(config.api_keys):
            if not key.strip():
                raise self.error(("apiKeys", str(i)), "API key is empty; remove it or set a value")
        for rpc_model, spec in config.models.items():  # agents take the gateway's key unless given their own
            if spec.rpc is not None and not spec.rpc.api_key and config.api_keys:
                config.models[rpc_model] = replace(spec, rpc=replace(spec.rpc, api_key=config.api_keys[0]))
        for i, name in enumerate(p.hooks.on_startup.preload):
            model_id = config.resolve(name)
            if model_id is None:
                self.dangling(("hooks", "on_startup", "preload", str(i)), name, "this preload")
            else:
                config.preload.append(model_id)
        config.warnings.extend(text for _, text in sorted(self.left_out))
        return config

    def ignore_paths(self, patterns: list[str]) -> tuple[re.Pattern[str], ...]:
        compiled = []
        for i, pattern in enumerate(patterns):
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise self.error(("upstream", "ignorePaths", str(i)), f"not a regular expression: {exc}") from None
        return tuple(compiled)

    def web_ui_notes(self) -> list[str]:
        """llama-swap's own web UI keys are accepted; say once what berth offers in their place."""
        given = sorted((key for key in ("ui", "performance", "captureBuffer") if key in self.raw),
                       key=self.raw.line_of)
        if not given:
            return []
        return [f"{self.path}:{self.raw.line_of(given[0])}: {', '.join(given)}: settings of llama-swap's web UI; "
                "berth's dashboard is /ui/ (models, memory, logs, recent requests; "
                "metricsMaxInMemory sets how many requests it keeps)"]

    def check_macro_names(self, macros: dict[str, schema.MacroValue], loc: tuple[str, ...]) -> None:
        for name in macros:
            if name in _RESERVED_MACROS:
                raise self.error(loc + (name,), f"macro name {name!r} is reserved; rename it")
            if not _MACRO_NAME.match(name):
                raise self.error(loc + (name,), "macro names may use only letters, digits, '_' and '-'")

    def expand_env(self, text: str, loc: tuple[str, ...]) -> str:
        def env_value(match: re.Match[str]) -> str:
            name = match.group(1)[len("env."):]
            if name not in self.environ:
                raise self.error(loc, f"environment variable {name!r} is not set (used as ${{env.{name}}})")
            return self.environ[name]

        return re.sub(r"\$\{(env\.[^}]*)\}", env_value, text)

    def expand(self, text: str, macros: dict[str, str], loc: tuple[str, ...], allow: set[str]) -> str:
        """Expand user macros (nested), ${env.X} and the reserved names given in `allow`."""
        for _ in range(_MAX_MACRO_DEPTH):
            expanded = _MACRO_REF.sub(lambda m: macros.get(m.group(1), m.group(0)), text)
            expanded = self.expand_env(expanded, loc)
            if expanded == text:
                break
            text = expanded
        else:
            raise self.error(loc, "macros refer to each other in a cycle (or nest deeper than 10)")
        for ref in _MACRO_REF.findall(text):
            if ref in _RESERVED_MACROS:
                if ref not in allow:
                    raise self.error(loc, f"${{{ref}}} cannot be used here")
            else:
                raise self.error(loc, f"unknown macro ${{{ref}}}; define it under macros:")
        return text

    def expand_value(self, value: Any, typed: dict[str, schema.MacroValue], macros: dict[str, str],
                     loc: tuple[str, ...], allow: set[str]) -> Any:
        """Macros in every string inside `value` (lists and mappings too). A string that is exactly one
        macro of a number or boolean takes that value's type, as llama-swap's metadata does."""
        if isinstance(value, str):
            whole = _MACRO_REF.fullmatch(value.strip())
            if whole and whole.group(1) in typed and not isinstance(typed[whole.group(1)], str):
                return typed[whole.group(1)]
            return self.expand(value, macros, loc, allow)
        if isinstance(value, dict):
            return {k: self.expand_value(v, typed, macros, loc + (str(k),), allow) for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand_value(v, typed, macros, loc + (str(i),), allow) for i, v in enumerate(value)]
        return value

    def dangling(self, loc: tuple[str, ...], name: str, what: str) -> None:
        """A reference to a model the config does not define (llama-swap's reference config has such
        illustrative names): reported with its line, and left out."""
        line = _line_of(self.raw, loc)
        self.left_out.append((line or 0, f"{self.path}:{line}: {'.'.join(loc)}: no model {name!r} is "
                                         f"defined under models:; {what} is left out"))

    def check_virtual_ids(self, config: BerthConfig) -> None:
        """Selectors and profile pins keep the targets that exist; a selector must not shadow a model."""
        def known(name: str) -> bool:
            return config.resolve(name) is not None or config.resolve_peer(name) is not None

        for sid, selector in list(config.selectors.items()):
            if known(sid):
                raise self.error(("selectors", sid), f"selector id {sid!r} is also a model, alias or peer model; "
                                                     "rename the selector")
            targets = []
            for i, target in enumerate(selector.targets):
                if target in config.selectors:
                    raise self.error(("selectors", sid, "targets", str(i)), "a selector's target cannot be a selector")
                if known(target):
                    targets.append(target)
                else:
                    self.dangling(("selectors", sid, "targets", str(i)), target, "this target")
            if not targets:
                raise self.error(("selectors", sid, "targets"), "none of the targets is a model, alias or peer model")
            config.selectors[sid] = replace(selector, targets=tuple(targets))
        for pid, profile in list(config.profiles.items()):
            pins = []
            for name, pinned in profile.pins:
                if pinned is not None and not known(pinned) and pinned not in config.selectors:
                    self.dangling(("profiles", pid, "pins", name), pinned, "this pin")
                else:
                    pins.append((name, pinned))
            config.profiles[pid] = replace(profile, pins=tuple(pins))

    def resolve_peer(self, peer_id: str, peer: schema.PeerConfig) -> PeerSpec:
        loc = ("peers", peer_id)
        macros = {k: _macro_text(v) for k, v in self.parsed.macros.items()}
        proxy = self.expand(peer.proxy, macros, loc + ("proxy",), set()).rstrip("/")
        if not proxy.startswith(("http://", "https://")):
            raise self.error(loc + ("proxy",), f"proxy {proxy!r} must be an http:// or https:// URL")
        if "/" in peer_id:
            raise self.error(loc, f"peer id {peer_id!r} may not contain '/': its models are named <peer>/<model>")
        for i, model in enumerate(peer.models):
            if f"{peer_id}/{model}" in self.parsed.models:
                raise self.error(loc + ("models", str(i)), f"{peer_id}/{model} is also a local model id; "
                                                           "rename one of them")
        return PeerSpec(peer_id, proxy, tuple(peer.models),
                        self.expand(peer.api_key, macros, loc + ("apiKey",), set()).strip(),
                        self.timeouts(peer.timeouts), _param_names(peer.filters.strip_params
                                                                   or peer.filters.legacy_strip_params),
                        self.params(peer.filters.set_params, dict(self.parsed.macros), macros,
                                    loc + ("filters", "setParams")))

    def params(self, values: dict[str, Any], typed: dict[str, schema.MacroValue], macros: dict[str, str],
               loc: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
        """Request parameters a filter sets, macros expanded. `model` is protected, as in llama-swap:
        dropped with a warning (useModelName renames what the model server is sent)."""
        if "model" in values:
            self.warnings.append(f"{self.path}:{_line_of(self.raw, loc + ('model',))}: {'.'.join(loc)}.model: "
                                 "a filter cannot set `model` (llama-swap protects it too); use useModelName")
            values = {k: v for k, v in values.items() if k != "model"}
        return tuple(self.expand_value(values, typed, macros, loc, {"MODEL_ID"}).items())

    def resolve_model(self, model_id: str, model: schema.ModelConfig, group: str) -> ModelSpec:
        loc = ("models", model_id)
        self.check_macro_names(model.macros, loc + ("macros",))
        typed = {**self.parsed.macros, **model.macros}
        macros = {k: _macro_text(v) for k, v in typed.items()}
        macros["MODEL_ID"] = model_id
        cmd = self.expand(model.cmd, macros, loc + ("cmd",), {"PORT", "MODEL_ID"})
        proxy = self.expand(model.proxy, macros, loc + ("proxy",), {"PORT", "MODEL_ID"})
        uses_port = PORT_MACRO in cmd or PORT_MACRO in proxy
        if PORT_MACRO in proxy and PORT_MACRO not in cmd:
            raise self.error(loc + ("cmd",),
                             "proxy uses ${PORT} but cmd does not; add `--port ${PORT}` to cmd or set proxy")
        proxy = proxy.rstrip("/")
        cmd_stop = self.expand(model.cmd_stop, macros, loc + ("cmdStop",), {"PORT", "MODEL_ID", "PID"})
        if not proxy.startswith(("http://", "https://")):
            raise self.error(loc + ("proxy",), f"proxy {proxy!r} must be an http:// or https:// URL")
        try:
            argv = split_command(cmd)
            stop_argv = split_command(cmd_stop) if cmd_stop.strip() else []
        except CommandSyntaxError as exc:
            raise self.error(loc + ("cmd",), str(exc)) from None
        if not argv:
            raise self.error(loc + ("cmd",), "cmd is empty; give the command that starts the model server")
        if model.model:
            try:
                parse_ref(model.model)
            except BadModelRef as exc:
                raise self.error(loc + ("model",), exc.message) from None
        elif model.mmproj:
            raise self.error(loc + ("mmproj",), "mmproj: true needs `model: owner/repo:QUANT` to pull it from")
        check = self.expand(model.check_endpoint, macros, loc + ("checkEndpoint",), {"MODEL_ID"}).strip()
        env = []
        for i, item in enumerate(model.env):
            key, _, value = self.expand(item, macros, loc + ("env", str(i)), {"PORT", "MODEL_ID"}).partition("=")
            env.append((key.strip(), value))
        strip = _param_names(self.expand_value(model.filters.strip_params or model.filters.legacy_strip_params,
                                               typed, macros, loc + ("filters", "stripParams"), {"MODEL_ID"}))
        everywhere = {"MODEL_ID"}  # and ${PORT} in metadata, filled in per run by /v1/models
        by_id = [(self.expand(key, macros, loc + ("filters", "setParamsByID", key), everywhere),
                  self.params(params, typed, macros, loc + ("filters", "setParamsByID", key)))
                 for key, params in model.filters.set_params_by_id.items()]
        spec = ModelSpec(
            id=model_id,
            argv=tuple(argv),
            stop_argv=tuple(stop_argv),
            proxy=proxy,
            uses_port=uses_port,
            env=tuple(env),
            check_endpoint=None if check.lower() == "none" else ("/" + check.lstrip("/")),
            ttl=self.parsed.global_ttl if model.ttl is None or model.ttl == -1 else model.ttl,
            aliases=tuple(dict.fromkeys([*(self.expand(a, macros, loc + ("aliases", str(i)), everywhere)
                                           for i, a in enumerate(model.aliases)),
                                         *(key for key, _ in by_id if key != model_id)])),
            group=group,
            unlisted=model.unlisted,
            use_model_name=self.expand(model.use_model_name, macros, loc + ("useModelName",), everywhere),
            concurrency_limit=model.concurrency_limit or DEFAULT_CONCURRENCY_LIMIT,
            strip_params=strip,
            set_params=self.params(model.filters.set_params, typed, macros, loc + ("filters", "setParams")),
            set_params_by_id=tuple(by_id),
            name=self.expand(model.name, macros, loc + ("name",), everywhere),
            description=self.expand(model.description, macros, loc + ("description",), everywhere),
            metadata=tuple(self.expand_value(model.metadata, typed, macros, loc + ("metadata",),
                                             everywhere | {"PORT"}).items()),
            unload_timeout=model.unload_timeout or self.parsed.unload_timeout,
            health_check_timeout=model.health_check_timeout or self.parsed.health_check_timeout,
            warmup=model.warmup,
            model_ref=model.model,
            mmproj=model.mmproj,
            kv_persistence=model.kv_persistence,
            kv_persistence_max_bytes=model.kv_persistence_max_bytes,
            kv_persistence_total_max_bytes=self.parsed.kv_persistence_total_max_bytes,
            declared_memory=self.sizes(model.memory, loc + ("memory",)),
            persistent=model.persistent,
            timeouts=self.timeouts(model.timeouts),
            health_check_interval=(self.parsed.health_check_interval if model.health_check_interval is None
                                   else model.health_check_interval),
            priority=self.parsed.routing.scheduler.settings.fifo.priority.get(model_id, 0),
            send_loading_state=(self.parsed.send_loading_state if model.send_loading_state is None
                                else model.send_loading_state),
            capabilities=Capabilities(tuple(model.capabilities.in_), tuple(model.capabilities.out),
                                      model.capabilities.tools, model.capabilities.reranker,
                                      model.capabilities.context),
            rpc=self.rpc(model.rpc, macros, loc + ("rpc",)) if model.rpc else None,
        )
        if model.rpc and any(a == "--rpc" or a.startswith("--rpc=") for a in argv):
            raise self.error(loc + ("cmd",), "berth writes --rpc from rpc.agents (with the ports the agents "
                                             "lease); remove --rpc from cmd")
        return spec

    def rpc(self, rpc: schema.RpcConfig, macros: dict[str, str], loc: tuple[str, ...]) -> RpcSpec:
        agents = []
        for i, written in enumerate(rpc.agents):
            agent = self.expand(written, macros, loc + ("agents", str(i)), set()).strip().lower()
            host, _, port = agent.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in agent:
                raise self.error(loc + ("agents", str(i)), f"agent {written!r} must be HOST:PORT, where "
                                                           "`berth agent --listen HOST:PORT` runs")
            if agent in agents:
                raise self.error(loc + ("agents", str(i)), f"agent {agent} is listed twice")
            agents.append(agent)
        ranges: list[tuple[str, int, int]] = []
        for agent, text in rpc.layers.items():
            where = loc + ("layers", agent)
            if rpc.placement != "experts":
                raise self.error(where, f"layer ranges are for placement: experts (this model has placement: "
                                        f"{rpc.placement}); remove rpc.layers")
            if agent.lower() not in agents:
                raise self.error(where, f"{agent} is not one of rpc.agents ({', '.join(agents)})")
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
            if match is None or int(match.group(2) or match.group(1)) < int(match.group(1)):
                raise self.error(where, f"{text!r} is not a layer range; write FIRST-LAST, e.g. 0-13")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            for other, o_first, o_last in ranges:
                if first <= o_last and o_first <= last:
                    raise self.error(where, f"layers {first}-{last} overlap {other}'s {o_first}-{o_last}")
            ranges.append((agent.lower(), first, last))
        key = self.expand(rpc.api_key, macros, loc + ("apiKey",), set()).strip()
        return RpcSpec(tuple(agents), rpc.placement, tuple(ranges), key)

    def timeouts(self, own: schema.TimeoutsConfig) -> UpstreamTimeouts:
        """A model's timeouts: its own, else the top-level ones, else the defaults."""
        default, top = UpstreamTimeouts(), self.parsed.timeouts

        def pick(name: str) -> float:
            for source in (own, top):
                value = getattr(source, name)
                if value is not None:
                    return float(value)
            return float(getattr(default, name))

        return UpstreamTimeouts(pick("connect"), pick("response_header"), pick("idle"), pick("tls_handshake"))

    def sizes(self, values: dict[str, str | int], loc: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
        parsed = []
        for device, amount in values.items():
            try:
                parsed.append((device_key(device), parse_size(amount)))
            except SizeError as exc:
                raise self.error(loc + (device,), str(exc)) from None
        return tuple(parsed)

    def memory_settings(self) -> MemorySettings:
        memory = self.parsed.memory
        try:
            headroom = parse_size(memory.headroom)
        except SizeError as exc:
            raise self.error(("memory", "headroom"), str(exc)) from None
        return MemorySettings(scheduled=memory.scheduling and not self.groups and not self.has_matrix,
                              budget=self.sizes(memory.budget, ("memory", "budget")), headroom_bytes=headroom,
                              eviction=memory.eviction)

    def check_aliases(self, models: dict[str, ModelSpec]) -> None:
        owner: dict[str, str] = {}
        for spec in models.values():
            for i, alias in enumerate(spec.aliases):
                loc = ("models", spec.id, "aliases", str(i))
                if alias in models:
                    raise self.error(loc, f"alias {alias!r} is also a model id; rename one of them")
                if alias in owner:
                    raise self.error(loc, f"alias {alias!r} is already used by model {owner[alias]!r}")
                owner[alias] = spec.id

    def routing(self) -> tuple[dict[str, schema.GroupConfig], tuple[str, ...],
                               tuple[schema.MatrixConfig, tuple[str, ...]] | None]:
        """Groups (and where they are written) and the matrix (and where), as llama-swap reads them: its
        current `routing.router` (where `use` picks one of the engines given under settings) or its older
        top-level `groups` / `matrix`, never both styles; and never groups and a matrix together."""
        p = self.parsed
        router = p.routing.router
        settings_loc = ("routing", "router", "settings")
        routing_raw = self.raw.get("routing")
        has_router = isinstance(routing_raw, LineDict) and "router" in routing_raw
        if (p.groups or p.matrix is not None) and has_router:
            where = ("groups",) if p.groups else ("matrix",)
            raise self.error(where, f"{where[0]} is given at the top level and routing.router too; move it under "
                                    "routing.router.settings (llama-swap's current place) and keep one")
        if has_router:
            if router.use == "matrix":
                if router.settings.matrix is None:
                    raise self.error(("routing", "router", "use"), "use: matrix needs routing.router.settings.matrix "
                                                                   "(vars, evict_costs, sets)")
                self.has_matrix = True
                return {}, settings_loc + ("groups",), (router.settings.matrix, settings_loc + ("matrix",))
            self.has_matrix = False  # use: group (the default); a matrix under settings waits unused
            return router.settings.groups, settings_loc + ("groups",), None
        if p.groups and p.matrix is not None:
            raise self.error(("matrix",), "a config cannot use both groups and a matrix; keep one")
        self.has_matrix = p.matrix is not None
        return p.groups, ("groups",), (p.matrix, ("matrix",)) if p.matrix is not None else None

    def resolve_matrix(self, matrix: schema.MatrixConfig, loc: tuple[str, ...]) -> MatrixSpec:
        models = self.parsed.models
        for var, model_id in matrix.vars.items():
            if not _MATRIX_VAR.match(var):
                raise self.error(loc + ("vars", var), "var names are 1-32 letters, digits, '-' or '.'")
            if model_id not in models:
                raise self.error(loc + ("vars", var), f"unknown model {model_id!r}; vars name ids under models: "
                                                      "(not aliases)")

        def model_of(name: str, where: tuple[str, ...]) -> str:
            if name in matrix.vars:
                return matrix.vars[name]
            if name in models:
                return name
            raise MatrixSyntaxError(f"{name!r} is neither a var nor a model id")

        expanded: dict[str, list[frozenset[str]]] = {}

        def set_named(name: str, trail: tuple[str, ...]) -> list[frozenset[str]]:
            if name in trail:
                raise MatrixSyntaxError(f"sets refer to each other in a cycle: {' -> '.join(trail + (name,))}")
            if name not in matrix.sets:
                raise MatrixSyntaxError(f"+{name} names no set under sets:")
            if name not in expanded:
                expanded[name] = expand_sets(matrix.sets[name], lambda n: model_of(n, ()),
                                             lambda ref: set_named(ref, trail + (name,)))
            return expanded[name]

        ordered: list[frozenset[str]] = []
        for name in matrix.sets:
            try:
                found = set_named(name, ())
            except MatrixSyntaxError as exc:
                raise self.error(loc + ("sets", name), str(exc)) from None
            ordered.extend(s for s in found if s not in ordered)
        costs: dict[str, float] = {}
        for name, cost in matrix.evict_costs.items():
            try:
                costs[model_of(name, ())] = cost
            except MatrixSyntaxError as exc:
                raise self.error(loc + ("evict_costs", name), str(exc)) from None
            if cost < 0:
                raise self.error(loc + ("evict_costs", name), "an eviction cost cannot be negative")
        return MatrixSpec(tuple(ordered), costs)

    def resolve_group_membership(self) -> dict[str, str]:
        group_of: dict[str, str] = {}
        for name, group in self.groups.items():
            for i, member in enumerate(group.members):
                loc = self.groups_loc + (name, "members", str(i))
                if member not in self.parsed.models:
                    self.dangling(loc, member, "this member")
                    continue
                if member in group_of:
                    raise self.error(loc, f"model {member!r} is already in group {group_of[member]!r}")
                group_of[member] = name
        for model_id in self.parsed.models:
            group_of.setdefault(model_id, DEFAULT_GROUP)
        return group_of

    def resolve_groups(self, group_of: dict[str, str]) -> dict[str, GroupSpec]:
        groups = {
            name: GroupSpec(name, g.swap, g.exclusive, g.persistent,
                            tuple(m for m in g.members if group_of.get(m) == name))
            for name, g in self.groups.items()
        }
        default_members = tuple(m for m, g in group_of.items() if g == DEFAULT_GROUP)
        if default_members:
            # As in llama-swap: ungrouped models swap among themselves and stop other groups.
            groups[DEFAULT_GROUP] = GroupSpec(DEFAULT_GROUP, True, True, False, default_members)
        return groups
