"""What a config or a model would run and take: `check` and `fit`."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

import click

from berth.cli.common import fail
from berth.cli.loading import load, store_for
from berth.config import BerthConfig, ModelSpec
from berth.core.errors import BadRequest
from berth.core.paths import berth_home
from berth.core.units import format_bytes
from berth.engine.embedded import embedded_config
from berth.engine.launch import Launch, build_launch
from berth.engine.llama_args import ArgvError, LlamaServerArgs
from berth.engine.redact import redact_argv
from berth.gateway.server import ask_agents
from berth.memory.backends import Backend, GpuRuntime
from berth.memory.devices import gpu_devices, inventory
from berth.memory.estimate import GPU, EstimateError, MemoryEstimate
from berth.memory.exact import ExactUnavailable, exact_fit
from berth.memory.fit import BudgetError, find_fit, parse_budget, swa_full_cost
from berth.memory.planner import LaunchFiles, MemoryLedger, MemoryPlanner, UnreadableModelFile, gpu_runtime
from berth.runtime.agents import AgentDirectory
from berth.store import ModelStore

_COLUMNS = ("weights_bytes", "kv_bytes", "compute_bytes", "output_bytes", "runtime_bytes", "total_bytes")
_MIB = 1024 * 1024


@click.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
def check(config_path: str) -> None:
    """Validate a config without starting anything; print what each model would run."""
    config = load(config_path)
    agents, planned_launch = _planned_launches(config, store_for(config))
    planner = MemoryPlanner(inventory(), MemoryLedger(berth_home() / "memory.json"), planned_launch)
    for spec in config.models.values():
        click.echo(spec.id)
        try:
            launch = planned_launch(spec)
        except BadRequest as exc:
            fail(exc.message)
        _print_launch(config, spec, launch, agents, planner)
        plan = planner.plan(spec)
        usage = ", ".join(f"{d} {format_bytes(b)}" for d, b in (plan.planned or {}).items()) or "unknown"
        click.echo(f"  memory:  {usage} ({plan.source}{': ' + plan.detail if plan.detail else ''})")
    budgets = {**agents.budgets(), **planner.budgets(config)}
    click.echo("budget:  " + ", ".join(f"{d} {format_bytes(b)}" for d, b in budgets.items())
               + ("" if config.memory.scheduled else " (scheduling: groups / swap)"))
    click.echo(f"config OK: {len(config.models)} models, {len(config.warnings)} warnings")


def _print_launch(config: BerthConfig, spec: ModelSpec, launch: Launch, agents: AgentDirectory,
                  planner: MemoryPlanner) -> None:
    click.echo(f"  argv:    {' '.join(redact_argv(launch.argv))}")
    port = "-"
    if spec.uses_port:
        port = f"{spec.preferred_port} when free at the start, else the first free from {config.start_port}"
    click.echo(f"  port:    {port}")
    click.echo(f"  aliases: {', '.join(spec.aliases) or '-'}")
    click.echo(f"  group:   {spec.group}")
    click.echo(f"  ttl:     {f'{spec.ttl}s' if spec.ttl else 'never'}")
    if launch.slots is not None:
        note = f" (--swa-full added for kvPersistence: true: {format_bytes(planner.swa_full_cost(launch.argv))} " \
               "more KV, restored slots of a sliding-window model need it)" if launch.slots.swa_full_added else ""
        click.echo(f"  kv:      slots saved in {launch.slots.directory}{note}")
    elif launch.slots_off:
        click.echo(f"  kv:      slots not saved: {launch.slots_off}")
    if spec.rpc is not None:
        offers = ", ".join(f"{a} offers {format_bytes(agents.offers[a])}" if a in agents.offers
                           else f"{a} did not answer (spread evenly)" for a in spec.rpc.agents)
        click.echo(f"  rpc:     placement {spec.rpc.placement}; {offers}; each agent's address stands for the "
                   "port its rpc server gets at each start")


def _planned_launches(config: BerthConfig,
                      store: ModelStore) -> tuple[AgentDirectory, Callable[[ModelSpec], Launch]]:
    """(the config's rpc agents, each model's launch as a start would run it without pulling anything). The
    agents are asked once for what they offer, which shares out a split; each agent's address stands for
    the port its rpc server gets at a start."""
    agents = AgentDirectory()
    asyncio.run(ask_agents(agents, config))

    def planned_launch(spec: ModelSpec) -> Launch:
        return build_launch(spec, store, rpc=agents.planned_targets(spec.rpc))

    return agents, planned_launch


@click.command()
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
@click.option("--backend", type=click.Choice([str(b) for b in Backend if b != Backend.CPU]), default=None,
              help="The GPU backend to plan for (default: the detected GPU's; cuda when a GPU is asked for "
                   "without one present).")
def fit(model: str, config_path: str | None, ctx: int | None, parallel: int | None, cache_type_k: str | None,
        cache_type_v: str | None, ngl: str | None, budget: str | None, headroom: float, max_context: bool,
        as_json: bool, exact: bool, backend: str | None) -> None:
    """Estimate a model's memory per device (GGUF path, store name or config model id)."""
    if exact and (budget or max_context):
        fail("--exact reports llama.cpp's own plan for free device memory; drop --budget/--max-context or --exact")
    config = load(config_path) if config_path else None
    store = store_for(config)
    args = _launch_flags(model, config, store)
    for dest, value in (("ctx_size", ctx), ("parallel", parallel), ("cache_type_k", cache_type_k),
                        ("cache_type_v", cache_type_v), ("n_gpu_layers", ngl)):
        if value is not None:
            args.set(dest, value)
    files = _read_files(args, store)
    try:
        budgets = parse_budget(budget) if budget else None
        wants_gpu = GPU in budgets if budgets is not None else _asks_for_gpu(args) or backend is not None
        gpu = _gpu_to_plan_for(backend, wants_gpu) if wants_gpu else None
        if exact:
            result, flags = _exact(args)
        elif budgets is not None:
            result, flags = _fitting(args, files, (budget or "", budgets), headroom, max_context, gpu)
        else:
            result, flags = files.estimate(args, gpu), []
        swa_full = swa_full_cost(files.model, args, gpu)
    except (EstimateError, BudgetError) as exc:
        fail(str(exc))
    extra = {"flash_attention": result.flash_attention, "swa_full_extra_kv_bytes": swa_full,
             "gpu_runtime": None if exact or gpu is None else
             {"backend": str(gpu.backend), "runtime_bytes": gpu.runtime_bytes, "source": gpu.source}}
    if as_json:
        _print_json(args.get("model"), result, flags, exact, extra)
    else:
        _print_table(args.get("model"), result, exact, extra)
        if flags:
            click.echo(f"llama-fit-params would run it with: {' '.join(flags)}" if exact
                       else f"fits {budget} with {headroom:.0%} headroom: {' '.join(flags)}")


def _launch_flags(model: str, config: BerthConfig | None, store: ModelStore) -> LlamaServerArgs:
    """MODEL's launch as typed flags: a model id of the config (or of the embedded models), a store name,
    or a GGUF path."""
    if config is None and store.entry(model) is None and not os.path.exists(model):
        embedded = embedded_config()
        config = embedded if embedded.resolve(model) else None
    if config is not None:
        model_id = config.resolve(model)
        if model_id is None:
            fail(f"model {model!r} is not in {config.path}; ids: {', '.join(config.models)}")
        try:
            argv = _planned_launches(config, store)[1](config.models[model_id]).argv
        except BadRequest as exc:
            fail(exc.message)
    else:
        entry = store.entry(model)
        argv = ["llama-server", "-m", str(entry.launch_model_path) if entry else model]
    try:
        args = LlamaServerArgs.parse(argv)
    except ArgvError as exc:
        fail(f"cannot read the launch settings: {exc}")
    if not args.get("model"):
        fail(f"the launch settings of {model} name no model file (-m) to read; give a GGUF path, a store name "
             "or a model whose cmd has -m (or `model:`)")
    return args


def _read_files(args: LlamaServerArgs, store: ModelStore) -> LaunchFiles:
    try:
        return LaunchFiles.read(args)
    except UnreadableModelFile as exc:
        if exc.projector:
            fail(f"the projector {exc.path} is not a readable GGUF file: {exc.reason}")
        if exc.missing:
            fail(f"{exc.path!r} is neither a GGUF file nor a model in the store at {store.root}; see `berth models`")
        fail(f"{exc.path} is not a readable GGUF file: {exc.reason}")


def _exact(args: LlamaServerArgs) -> tuple[MemoryEstimate, list[str]]:
    try:
        found = exact_fit(args)
    except ExactUnavailable as exc:
        fail(str(exc), 1)
    return MemoryEstimate(devices=found.devices), found.flags


def _fitting(args: LlamaServerArgs, files: LaunchFiles, budget: tuple[str, dict[str, int]], headroom: float,
             max_context: bool, gpu: GpuRuntime | None) -> tuple[MemoryEstimate, list[str]]:
    """`budget`: as written, and per device."""
    found = find_fit(files.model, args, budget[1], headroom, max_context, files.projector, gpu)
    if found is None:
        fail(f"{args.get('model')} does not fit {budget[0]} even with every layer on the host and the smallest "
             "context", 1)
    return found.estimate, found.flags


def _gpu_to_plan_for(backend: str | None, wanted: bool) -> GpuRuntime | None:
    """The GPU `berth fit` plans for: the detected one (its learned runtime overhead, else its backend's
    default), or `backend`'s default; CUDA when a GPU is wanted and none is present."""
    detected = gpu_devices()
    if detected:
        return gpu_runtime(detected[0], MemoryLedger(berth_home() / "memory.json"), Backend(backend) if backend else None)
    return GpuRuntime.default(Backend(backend or Backend.CUDA)) if wanted or backend else None


def _asks_for_gpu(args: LlamaServerArgs) -> bool:
    """Whether flags offload layers to a GPU of this machine: -ngl given, and with --rpc, -ts shares beyond
    the rpc servers' (they come first in llama.cpp's device list)."""
    if args.get("n_gpu_layers") in (None, "0"):
        return False
    servers = [e for e in (args.get("rpc") or "").split(",") if e]
    return not servers or len([x for x in (args.get("tensor_split") or "").split(",") if x]) > len(servers)


def _device_bytes(result: MemoryEstimate) -> dict[str, dict[str, int]]:
    return {name: {column: getattr(d, column) for column in _COLUMNS} for name, d in result.devices.items()}


def _print_json(path: str, result: MemoryEstimate, flags: list[str], exact: bool, extra: dict) -> None:
    click.echo(json.dumps({"model": path, "method": "llama-fit-params" if exact else "estimate",
                           "devices": _device_bytes(result), "total_bytes": result.total_bytes,
                           "kv_cells_per_stream": result.kv_cells, "swa_cells_per_stream": result.swa_cells,
                           "streams": result.streams, **extra, "flags": flags}, indent=2))


def _print_table(path: str, result: MemoryEstimate, exact: bool, extra: dict) -> None:
    if exact:
        click.echo(f"{path}: llama.cpp's dry run (llama-fit-params; compute is its worst-case reserve)")
    else:
        click.echo(f"{path}: {result.streams} stream(s) of {result.kv_cells} KV cells"
                   + (f", sliding-window layers {result.swa_cells} cells" if result.swa_cells else "")
                   + f", flash attention {'on' if result.flash_attention else 'off'}")
    devices = _device_bytes(result)
    width = max(8, *(len(name) for name in devices))  # rpc:HOST:PORT names are long
    click.echo(f"{'DEVICE':{width}} " + " ".join(f"{c.removesuffix('_bytes').upper():>12}" for c in _COLUMNS))
    for name, d in devices.items():
        click.echo(f"{name:{width}} " + " ".join(f"{d[k] / _MIB:>8.1f} MiB" for k in _COLUMNS))
    click.echo(f"{'total':{width}} " + " ".join(f"{'':>12}" for _ in _COLUMNS[:-1])
               + f" {result.total_bytes / _MIB:>8.1f} MiB")
    runtime = extra["gpu_runtime"]
    if runtime is not None:
        click.echo(f"RUNTIME on {GPU}: {runtime['runtime_bytes'] / _MIB:.1f} MiB of {runtime['backend']} runtime "
                   f"(context, BLAS workspace, kernels) beside llama.cpp's buffers: {runtime['source']}")
    if extra["swa_full_extra_kv_bytes"]:
        click.echo(f"--swa-full keeps the whole context in every sliding-window layer: "
                   f"{extra['swa_full_extra_kv_bytes'] / _MIB:.1f} MiB of KV more than without it (berth adds it "
                   "only for kvPersistence: true)")
