"""Load a llama-swap style config into resolved, typed records, in one pass: YAML with lines
(`yamlines`), the schema (`schema`, pydantic), then resolution (models and peers in `models`, groups,
matrix and names in `routing`, the top level here).

Everything a user can get wrong is reported as ConfigError(path, line, key,
message); keys berth does not implement become warnings with their line.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ValidationError

from berth.config import routing, schema
from berth.config.keys import resolve_api_keys
from berth.config.macros import check_macro_names, expand_env
from berth.config.models import resolve_model, resolve_peer, sizes
from berth.config.reading import Reading, carried, unknown_keys
from berth.config.records import BerthConfig, MemorySettings, ModelSpec, ProfileSpec, RemoteImages, SelectorSpec
from berth.config.yamlines import LineDict, empty_mapping, line_at, load_yaml
from berth.core.errors import ConfigError
from berth.core.units import SizeError, parse_size

_WEB_UI_KEYS = ("ui", "performance", "captureBuffer")  # llama-swap's own web UI settings
MAX_PORT = 65535


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
        raw = empty_mapping()
    if not isinstance(raw, LineDict):
        raise ConfigError(path, 1, "", "the top level must be a mapping with a `models:` key")
    warnings = unknown_keys(raw, path)
    try:
        parsed = schema.BerthConfigFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(str(part) for part in first["loc"])
        raise ConfigError(path, line_at(raw, loc), ".".join(loc), first["msg"]) from None
    reading = Reading(path, raw, parsed, environ if environ is not None else dict(os.environ), warnings)
    return _resolve(reading)


def _resolve(reading: Reading) -> BerthConfig:
    p = reading.parsed
    check_macro_names(reading, p.macros, ("macros",))
    layout = routing.read_routing(reading)
    routing.check_priorities(reading)
    group_of = routing.group_membership(reading, layout)
    models = _with_preferred_ports({model_id: resolve_model(reading, model_id, model, group_of[model_id])
                                    for model_id, model in p.models.items()}, p.start_port)
    routing.check_aliases(reading, models)
    config = BerthConfig(**carried(p, BerthConfig, {
        "path": reading.path,
        "models": models,
        "groups": routing.resolve_groups(layout, group_of),
        "matrix": routing.resolve_matrix(reading, layout.matrix, layout.matrix_loc) if layout.matrix else None,
        "peers": {peer_id: resolve_peer(reading, peer_id, peer) for peer_id, peer in p.peers.items()},
        "selectors": {sid: SelectorSpec(sid, sel.strategy, tuple(sel.targets), sel.settings.spillover,
                                        sel.name, sel.description, tuple(sel.metadata.items()))
                      for sid, sel in p.selectors.items()},
        "profiles": {pid: ProfileSpec(pid, prof.description, tuple((k, v or None) for k, v in prof.pins.items()))
                     for pid, prof in p.profiles.items()},
        "api_keys": resolve_api_keys(reading),
        "allowed_hosts": [h.strip().lower() for h in p.allowed_hosts],
        "allowed_origins": [_origin(reading, o, i) for i, o in enumerate(p.allowed_origins)],
        "store_dir": _store_dir(reading),
        "memory": _memory_settings(reading, scheduled=not layout.groups and layout.matrix is None),
        "remote_images": _remote_images(reading),
        "log_time_format": p.log_time_format or None,
        "upstream_ignore_paths": _ignore_paths(reading, p.upstream.ignore_paths),
        "notes": _web_ui_notes(reading),
    }))
    routing.check_virtual_ids(reading, config)
    routing.return_targets(reading, config)
    _check_rpc_keys(reading, config)
    config.preload = routing.preloads(reading, config)
    config.fallback_model = routing.fallback_model(reading, config)
    config.warnings = reading.findings()
    return config


def _with_preferred_ports(models: dict[str, ModelSpec], start_port: int) -> dict[str, ModelSpec]:
    """Each model that uses `${PORT}` gets the port llama-swap gives it: startPort upwards, one per such
    model, in the order of their ids (so adding a model moves only the ones after it)."""
    numbered = sorted(model_id for model_id, spec in models.items() if spec.uses_port)
    ports = dict(zip(numbered, range(start_port, MAX_PORT + 1)))
    return {model_id: replace(spec, preferred_port=ports.get(model_id)) for model_id, spec in models.items()}


def _check_rpc_keys(reading: Reading, config: BerthConfig) -> None:
    """An rpc agents' key is a secret of its own, never a client's."""
    digests = {key.digest for key in config.api_keys}
    for rpc_model, spec in config.models.items():
        if spec.rpc is not None and (problem := spec.rpc.key_problem(rpc_model, digests)):
            reading.warn(("models", rpc_model, "rpc", "apiKey"), problem)


def _origin(reading: Reading, written: str, index: int) -> str:
    """An origin as browsers send it in `Origin`: scheme://host[:port], lower case, no path; or "*"."""
    origin = written.strip().rstrip("/").lower()
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise reading.error(("allowedOrigins", str(index)), f"{written!r} is not an origin; write "
                            "scheme://host[:port] as the browser's address bar shows the page, e.g. "
                            "https://chat.example.com or http://localhost:3000 (or \"*\" for any page)")
    return origin


def _store_dir(reading: Reading) -> Path | None:
    written = reading.parsed.model_store
    return Path(os.path.expanduser(expand_env(reading, written, ("modelStore",)))) if written else None


def _memory_settings(reading: Reading, scheduled: bool) -> MemorySettings:
    """`memory:`; scheduling by memory applies only to a config without groups or a matrix."""
    memory = reading.parsed.memory
    try:
        headroom = parse_size(memory.headroom)
    except SizeError as exc:
        raise reading.error(("memory", "headroom"), str(exc)) from None
    return MemorySettings(scheduled=memory.scheduling and scheduled,
                          budget=sizes(reading, memory.budget, ("memory", "budget")), headroom_bytes=headroom,
                          eviction=memory.eviction)


def _remote_images(reading: Reading) -> RemoteImages:
    written = reading.parsed.remote_images
    try:
        max_bytes = parse_size(written.max_bytes)
    except SizeError as exc:
        raise reading.error(("remoteImages", "maxBytes"), str(exc)) from None
    if max_bytes <= 0:
        raise reading.error(("remoteImages", "maxBytes"), "must be more than 0 bytes; to refuse image URLs, "
                            "set fetch: false")
    return RemoteImages(**carried(written, RemoteImages, {"max_bytes": max_bytes}))


def _ignore_paths(reading: Reading, patterns: list[str]) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for i, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise reading.error(("upstream", "ignorePaths", str(i)), f"not a regular expression: {exc}") from None
    return tuple(compiled)


def _web_ui_notes(reading: Reading) -> list[str]:
    """llama-swap's own web UI keys are accepted; say once what berth offers in their place."""
    raw = reading.raw
    given = sorted((key for key in _WEB_UI_KEYS if key in raw), key=raw.line_of)
    if not given:
        return []
    return [f"{reading.path}:{raw.line_of(given[0])}: {', '.join(given)}: settings of llama-swap's web UI; "
            "berth's dashboard is /ui/ (memory map, timeline, activity, playground, models, logs; "
            "metricsMaxInMemory sets how many requests it keeps, captureBodies: true keeps their bodies)"]
