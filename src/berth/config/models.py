"""Resolving one model (and one peer) of the config into its record: macros expanded, the command
split into argv, references checked, defaults taken from the top level.

Fields named as in the schema are carried over by `reading.carried`; the functions here fill in the
rest, each for one concern (command, filters, listing, rpc, limits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from berth.config import schema
from berth.config.cmdline import CommandSyntaxError, split_command
from berth.config.macros import Macros, check_macro_names
from berth.config.reading import Reading, carried
from berth.config.records import (
    DEFAULT_CONCURRENCY_LIMIT, PORT_MACRO, Capabilities, ModelSpec, PeerSpec, RpcSpec, UpstreamTimeouts,
)
from berth.core.hosts import is_loopback
from berth.core.refs import BadModelRef, parse_ref
from berth.core.units import SizeError, device_key, parse_size

_LAYER_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_RUNTIME = frozenset({"PORT", "MODEL_ID"})  # filled in at each start
_EVERYWHERE = frozenset({"MODEL_ID"})


def resolve_model(reading: Reading, model_id: str, model: schema.ModelConfig, group: str) -> ModelSpec:
    loc = ("models", model_id)
    check_macro_names(reading, model.macros, loc + ("macros",))
    macros = Macros(reading, {**reading.parsed.macros, **model.macros}, model_id)
    resolved = {"id": model_id, "group": group, **_command(reading, macros, model, loc)}
    _check_store_reference(reading, model, loc)
    resolved["check_endpoint"] = _check_endpoint(macros.expand(model.check_endpoint, loc + ("checkEndpoint",),
                                                               _EVERYWHERE))
    resolved["env"] = _environment(macros, model.env, loc + ("env",))
    resolved.update(_filters(reading, macros, model, loc))
    requested_ids = [key for key, _ in resolved["set_params_by_id"] if key != model_id]
    resolved.update(_listing(macros, model, loc, requested_ids, resolved["uses_port"]))
    resolved.update(_limits(reading, model_id, model))
    resolved["declared_memory"] = sizes(reading, model.memory, loc + ("memory",))
    resolved["timeouts"] = timeouts(reading.parsed.timeouts, model.timeouts)
    resolved["capabilities"] = Capabilities(tuple(model.capabilities.in_), tuple(model.capabilities.out),
                                            model.capabilities.tools, model.capabilities.reranker,
                                            model.capabilities.context)
    resolved["model_ref"] = model.model
    resolved["return_to"] = None  # a model id, once every model is known (routing.return_targets)
    resolved["rpc"] = _rpc(reading, macros, model.rpc, loc + ("rpc",)) if model.rpc else None
    if model.rpc and any(a == "--rpc" or a.startswith("--rpc=") for a in resolved["argv"]):
        raise reading.error(loc + ("cmd",), "berth writes --rpc from rpc.agents (with the ports the agents "
                                            "lease); remove --rpc from cmd")
    return ModelSpec(**carried(model, ModelSpec, resolved, defaults=reading.parsed))


def _command(reading: Reading, macros: Macros, model: schema.ModelConfig, loc: tuple[str, ...]) -> dict[str, Any]:
    """argv, stop_argv, proxy and whether a start must choose a port."""
    cmd = macros.expand(model.cmd, loc + ("cmd",), _RUNTIME)
    proxy = macros.expand(model.proxy, loc + ("proxy",), _RUNTIME)
    if PORT_MACRO in proxy and PORT_MACRO not in cmd:
        raise reading.error(loc + ("cmd",),
                            "proxy uses ${PORT} but cmd does not; add `--port ${PORT}` to cmd or set proxy")
    cmd_stop = macros.expand(model.cmd_stop, loc + ("cmdStop",), _RUNTIME | {"PID"})
    _check_url(reading, proxy.rstrip("/"), loc + ("proxy",))
    try:
        argv = split_command(cmd)
        stop_argv = split_command(cmd_stop) if cmd_stop.strip() else []
    except CommandSyntaxError as exc:
        raise reading.error(loc + ("cmd",), str(exc)) from None
    if not argv:
        raise reading.error(loc + ("cmd",), "cmd is empty; give the command that starts the model server")
    return {"argv": tuple(argv), "stop_argv": tuple(stop_argv), "proxy": proxy.rstrip("/"),
            "uses_port": PORT_MACRO in cmd or PORT_MACRO in proxy}


def _check_url(reading: Reading, url: str, loc: tuple[str, ...]) -> None:
    if not url.startswith(("http://", "https://")):
        raise reading.error(loc, f"proxy {url!r} must be an http:// or https:// URL")


def _check_store_reference(reading: Reading, model: schema.ModelConfig, loc: tuple[str, ...]) -> None:
    if model.model:
        try:
            parse_ref(model.model)
        except BadModelRef as exc:
            raise reading.error(loc + ("model",), exc.message) from None
    elif model.mmproj:
        raise reading.error(loc + ("mmproj",), "mmproj: true needs `model: owner/repo:QUANT` to pull it from")


def _check_endpoint(written: str) -> str | None:
    """The health check path; None for `none` (no health check)."""
    check = written.strip()
    return None if check.lower() == "none" else "/" + check.lstrip("/")


def _environment(macros: Macros, entries: list[str], loc: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    env = []
    for i, item in enumerate(entries):
        key, _, value = macros.expand(item, loc + (str(i),), _RUNTIME).partition("=")
        env.append((key.strip(), value))
    return tuple(env)


def _filters(reading: Reading, macros: Macros, model: schema.ModelConfig, loc: tuple[str, ...]) -> dict[str, Any]:
    """strip_params, set_params and set_params_by_id (whose ids become aliases)."""
    filters, where = model.filters, loc + ("filters",)
    strip = param_names(macros.expand_value(filters.strip_params or filters.legacy_strip_params,
                                            where + ("stripParams",), _EVERYWHERE))
    by_id = tuple((macros.expand(key, where + ("setParamsByID", key), _EVERYWHERE),
                   params(reading, macros, params_given, where + ("setParamsByID", key)))
                  for key, params_given in filters.set_params_by_id.items())
    return {"strip_params": strip, "set_params_by_id": by_id,
            "set_params": params(reading, macros, filters.set_params, where + ("setParams",))}


def _listing(macros: Macros, model: schema.ModelConfig, loc: tuple[str, ...],
             requested_ids: list[str], uses_port: bool) -> dict[str, Any]:
    """What /v1/models shows and the names a request may use (its aliases, then the other ids its
    setParamsByID answers to). ${PORT} in metadata is filled in when listed, and only a model whose cmd
    has one may use it (as in llama-swap)."""
    metadata_macros = _EVERYWHERE | {"PORT"} if uses_port else _EVERYWHERE
    aliases = [macros.expand(alias, loc + ("aliases", str(i)), _EVERYWHERE) for i, alias in enumerate(model.aliases)]
    return {
        "aliases": tuple(dict.fromkeys([*aliases, *requested_ids])),
        "use_model_name": macros.expand(model.use_model_name, loc + ("useModelName",), _EVERYWHERE),
        "name": macros.expand(model.name, loc + ("name",), _EVERYWHERE),
        "description": macros.expand(model.description, loc + ("description",), _EVERYWHERE),
        "metadata": tuple(macros.expand_value(model.metadata, loc + ("metadata",), metadata_macros).items()),
    }


def _limits(reading: Reading, model_id: str, model: schema.ModelConfig) -> dict[str, Any]:
    """Settings whose default is not a same-named top-level key (those are carried)."""
    top = reading.parsed
    return {
        "ttl": top.global_ttl if model.ttl is None or model.ttl == -1 else model.ttl,
        "concurrency_limit": model.concurrency_limit or DEFAULT_CONCURRENCY_LIMIT,
        "unload_timeout": model.unload_timeout or top.unload_timeout,
        "kv_persistence_total_max_bytes": top.kv_persistence_total_max_bytes,
        "priority": top.routing.scheduler.settings.fifo.priority.get(model_id, 0),
    }


def _rpc(reading: Reading, macros: Macros, rpc: schema.RpcConfig, loc: tuple[str, ...]) -> RpcSpec:
    agents: list[str] = []
    for i, written in enumerate(rpc.agents):
        agent = macros.expand(written, loc + ("agents", str(i))).strip().lower()
        host, _, port = agent.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in agent:
            raise reading.error(loc + ("agents", str(i)), f"agent {written!r} must be HOST:PORT, where "
                                                          "`berth agent --listen HOST:PORT` runs")
        if agent in agents:
            raise reading.error(loc + ("agents", str(i)), f"agent {agent} is listed twice")
        agents.append(agent)
    ranges = _layer_ranges(reading, rpc, agents, loc + ("layers",))
    key = macros.expand(rpc.api_key, loc + ("apiKey",)).strip()
    return RpcSpec(tuple(agents), rpc.placement, ranges, key)


def _layer_ranges(reading: Reading, rpc: schema.RpcConfig, agents: list[str],
                  loc: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    ranges: list[tuple[str, int, int]] = []
    for agent, text in rpc.layers.items():
        where = loc + (agent,)
        if rpc.placement != "experts":
            raise reading.error(where, f"layer ranges are for placement: experts (this model has placement: "
                                       f"{rpc.placement}); remove rpc.layers")
        if agent.lower() not in agents:
            raise reading.error(where, f"{agent} is not one of rpc.agents ({', '.join(agents)})")
        match = _LAYER_RANGE.fullmatch(str(text))
        if match is None or int(match.group(2) or match.group(1)) < int(match.group(1)):
            raise reading.error(where, f"{text!r} is not a layer range; write FIRST-LAST, e.g. 0-13")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        for other, o_first, o_last in ranges:
            if first <= o_last and o_first <= last:
                raise reading.error(where, f"layers {first}-{last} overlap {other}'s {o_first}-{o_last}")
        ranges.append((agent.lower(), first, last))
    return tuple(ranges)


def resolve_peer(reading: Reading, peer_id: str, peer: schema.PeerConfig) -> PeerSpec:
    loc = ("peers", peer_id)
    macros = Macros(reading, reading.parsed.macros)
    proxy = macros.expand(peer.proxy, loc + ("proxy",)).rstrip("/")
    _check_url(reading, proxy, loc + ("proxy",))
    if "/" in peer_id:
        raise reading.error(loc, f"peer id {peer_id!r} may not contain '/': its models are named <peer>/<model>")
    for i, model in enumerate(peer.models):
        if f"{peer_id}/{model}" in reading.parsed.models:
            raise reading.error(loc + ("models", str(i)), f"{peer_id}/{model} is also a local model id; "
                                                          "rename one of them")
    api_key = macros.expand(peer.api_key, loc + ("apiKey",)).strip()
    host = urlsplit(proxy).hostname or ""
    if api_key and proxy.startswith("http://") and not is_loopback(host):
        reading.warn(loc + ("apiKey",), f"sent over plain http to {host}, where anyone on the network path can "
                                        "read it; use an https:// proxy URL (or a VPN such as WireGuard between the "
                                        "machines)")
    return PeerSpec(peer_id, proxy, tuple(peer.models), api_key, timeouts(reading.parsed.timeouts, peer.timeouts),
                    param_names(peer.filters.strip_params or peer.filters.legacy_strip_params),
                    params(reading, macros, peer.filters.set_params, loc + ("filters", "setParams")))


def params(reading: Reading, macros: Macros, values: dict[str, Any],
           loc: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """Request parameters a filter sets, macros expanded. `model` is protected, as in llama-swap:
    dropped with a warning (useModelName renames what the model server is sent)."""
    if "model" in values:
        reading.warn(loc + ("model",), "a filter cannot set `model` (llama-swap protects it too); use useModelName")
        values = {k: v for k, v in values.items() if k != "model"}
    return tuple(macros.expand_value(values, loc, _EVERYWHERE).items())


def param_names(given: str | list[str]) -> tuple[str, ...]:
    """stripParams as names: a comma-separated string or a list; never `model` (it stays)."""
    names = given.split(",") if isinstance(given, str) else given
    return tuple(n.strip() for n in names if n.strip() and n.strip() != "model")


def timeouts(top: schema.TimeoutsConfig, own: schema.TimeoutsConfig) -> UpstreamTimeouts:
    """Upstream timeouts: `own`, else the top level's, else the defaults."""
    default = UpstreamTimeouts()

    def pick(name: str) -> float:
        for source in (own, top):
            value = getattr(source, name)
            if value is not None:
                return float(value)
        return float(getattr(default, name))

    return UpstreamTimeouts(pick("connect"), pick("response_header"), pick("idle"), pick("tls_handshake"))


def sizes(reading: Reading, values: dict[str, str | int], loc: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """Per-device amounts (`ram: 2GiB`, `gpu0: 6GiB`) in bytes."""
    parsed = []
    for device, amount in values.items():
        try:
            parsed.append((device_key(device), parse_size(amount)))
        except SizeError as exc:
            raise reading.error(loc + (device,), str(exc)) from None
    return tuple(parsed)
