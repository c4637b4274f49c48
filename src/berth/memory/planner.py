"""Each model's planned memory, from what is known best: declared > measured > estimated.

- declared: `memory:` in the model's config (any engine, e.g. a vLLM cmd);
- measured: what the model's process group really used after its last start with
  the same argv and model file, kept in `$BERTH_HOME/memory.json` across restarts;
- estimated: `memory.estimate` from the GGUF header and the launch settings,
  for llama.cpp engines whose model file is on disk.
Anything else is unknown, and the scheduler runs it alone.
"""

from __future__ import annotations

import enum
import re
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from berth.config import BerthConfig, ModelSpec
from berth.engine.identity import launch_identity
from berth.engine.launch import Launch, server_args
from berth.engine.llama_args import LlamaServerArgs
from berth.core.errors import BerthError
from berth.core.paths import write_private
from berth.memory.backends import Backend, GpuRuntime
from berth.memory.devices import Device, cpu_repacked_types
from berth.memory.estimate import GPU, EstimateError, MemoryEstimate, estimate
from berth.memory.fit import swa_full_cost
from berth.core.units import HOST, format_bytes
from berth.core.gguf import GGUFHeader, GGUFInvalid, read_model_header

log = logging.getLogger("berth.memory")



class PlanSource(enum.StrEnum):
    """Where a model's planned memory comes from, best first."""

    DECLARED = "declared"  # `memory:` in the config
    MEASURED = "measured"  # its last run with the same launch
    ESTIMATED = "estimated"  # the GGUF header and the flags
    FIT = "fit"  # llama.cpp's --fit places it: each GPU up to its free memory less the fit target
    UNKNOWN = "unknown"  # none of these: it runs alone


@dataclass(frozen=True)
class ModelMemory:
    planned: dict[str, int] | None  # bytes per device the scheduler counts; None = unknown
    source: PlanSource
    detail: str = ""  # why unknown, or where the figure comes from
    # the estimate's parts per device (weights, kv, compute, output, runtime), where there is an estimate that
    # maps onto the devices as they are (one GPU or none); the dashboard shows them
    components: dict[str, dict[str, int]] | None = None


def components(result: MemoryEstimate, devices: dict[str, Device]) -> dict[str, dict[str, int]] | None:
    """The parts of an estimate per device, when its devices are the machine's (several GPUs share its one
    GPU figure in proportion, so its parts are not theirs)."""
    if sum(1 for name in devices if name.startswith("gpu")) > 1:
        return None
    return {name: {"weights": d.weights_bytes, "kv": d.kv_bytes, "compute": d.compute_bytes,
                   "output": d.output_bytes, "runtime": d.runtime_bytes}
            for name, d in result.devices.items() if d.total_bytes}


def budgets(devices: dict[str, Device], explicit: dict[str, int], headroom: int) -> dict[str, int]:
    """Usable bytes per device: the configured budget, else what was free at startup, less headroom."""
    result = {}
    for name, device in devices.items():
        base = explicit.get(name, device.free_bytes)
        result[name] = max(base - headroom, 0)
    for name, amount in explicit.items():  # a budget for a device not seen (declared memory, tests)
        result.setdefault(name, max(amount - headroom, 0))
    return result


def _spread_over_gpus(result: MemoryEstimate, devices: dict[str, Device],
                      runtime: Callable[[str], GpuRuntime]) -> dict[str, int]:
    """Bytes per device of an estimate made for one GPU: llama.cpp splits offloaded layers over GPUs in
    proportion to their memory by default, and each GPU carries its own runtime overhead."""
    usage = {name: d.total_bytes for name, d in result.devices.items() if d.total_bytes}
    gpus = sorted(n for n in devices if n.startswith("gpu"))
    if len(gpus) < 2 or GPU not in usage:
        return usage
    total = sum(devices[n].total_bytes for n in gpus)
    buffers = usage.pop(GPU) - result.devices[GPU].runtime_bytes
    for name in gpus:
        usage[name] = usage.get(name, 0) + buffers * devices[name].total_bytes // total + runtime(name).runtime_bytes
    return usage


DEFAULT_FIT_TARGET_MIB = 1024  # llama.cpp's --fit-target: memory --fit leaves free on each device


def fit_placement(estimated: dict[str, int], args: LlamaServerArgs | None,
                  devices: dict[str, Device]) -> tuple[dict[str, int], PlanSource, str] | None:
    """With `--fit` (on by default) and -ngl left to it, llama.cpp places the model itself at load: each
    GPU takes what it can up to its free memory less `--fit-target` MiB (common/fit.cpp), and what does
    not fit stays on the host. The plan is then that: min(estimate, free - target) per GPU, the rest on the
    host. None when --fit has nothing to place (off, -ngl given, or no GPU)."""
    gpus = sorted(name for name in devices if name.startswith("gpu"))
    if args is None or not gpus or args.get("n_gpu_layers") is not None:
        return None
    if args.switched_off("fit"):
        return None
    written = [t for t in re.split(r"[,/]", str(args.get("fit_target") or "")) if t.strip()]
    try:
        targets = [int(t) * 1024**2 for t in written] or [DEFAULT_FIT_TARGET_MIB * 1024**2]
    except ValueError:
        return None  # llama-server refuses such a value at start, with its own message
    planned, spilled, notes = dict(estimated), 0, []
    for index, gpu in enumerate(gpus):
        target = targets[index] if index < len(targets) else targets[0] if len(targets) == 1 else 0
        room = max(devices[gpu].free_bytes - target, 0)
        wanted = planned.get(gpu, 0)
        if wanted > room:
            planned[gpu], spilled = room, spilled + wanted - room
        notes.append(f"{gpu} up to {format_bytes(room)} (free less --fit-target {format_bytes(target)})")
    if spilled:
        planned[HOST] = planned.get(HOST, 0) + spilled
    return planned, PlanSource.FIT, "llama.cpp's --fit places it at load: " + ", ".join(notes)


def _combine(measured: dict[str, int], estimated: dict[str, int] | None) -> dict[str, int]:
    """GPU allocations are committed at load, so the measurement is the truth there. Host memory is
    counted by resident pages, and a KV cache's pages become resident only as contexts fill: a
    measurement below the estimate does not prove the model needs less, so the larger one counts."""
    planned = dict(measured)
    for device, amount in (estimated or {}).items():
        if device == HOST:
            planned[device] = max(planned.get(device, 0), amount)
        else:
            planned.setdefault(device, amount)
    return planned


class UnreadableModelFile(Exception):
    """A launch's model or projector file is not on disk (`missing`) or not a readable GGUF file."""

    def __init__(self, path: str, projector: bool, missing: bool, reason: str) -> None:
        super().__init__(reason)
        self.path, self.projector, self.missing, self.reason = path, projector, missing, reason


@dataclass(frozen=True)
class LaunchFiles:
    """The GGUF headers a llama.cpp launch loads: its model (a split model's parts joined) and its projector.
    The one reading of launch flags into an estimate, for the planner and for `berth fit`."""

    model: GGUFHeader
    projector: GGUFHeader | None

    @classmethod
    def read(cls, args: LlamaServerArgs) -> LaunchFiles:
        """Raises UnreadableModelFile (the model first, then the projector)."""
        model = _read_header(args.get("model"), projector=False)
        projector = _read_header(args.get("mmproj"), projector=True) if args.get("mmproj") else None
        return cls(model, projector)

    def estimate(self, args: LlamaServerArgs, gpu: GpuRuntime | None) -> MemoryEstimate:
        """The estimate for these flags with this GPU (None: none) and this machine's CPU (its repacked weight
        types); raises EstimateError."""
        return estimate(self.model, args, gpu, repacked=cpu_repacked_types(), projector=self.projector)


def _read_header(path: str, projector: bool) -> GGUFHeader:
    try:
        return read_model_header(path)
    except FileNotFoundError as exc:
        raise UnreadableModelFile(path, projector, True, str(exc)) from None
    except (GGUFInvalid, OSError) as exc:
        raise UnreadableModelFile(path, projector, False, str(exc)) from None


class MemoryLedger:
    """Measured usage per (argv, model file), and the GPU runtime overhead per GPU model and driver,
    kept on disk so a restart plans with them."""

    GPU_RUNTIME = "gpu_runtime"  # the section of runtime overheads (launch keys are hex digests)

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._entries: dict[str, dict] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._entries = {}

    def get(self, key: str) -> dict[str, int] | None:
        entry = self._entries.get(key) if key != self.GPU_RUNTIME else None
        return dict(entry["usage"]) if entry else None

    def record(self, key: str, model_id: str, usage: dict[str, int]) -> None:
        self._entries[key] = {"model": model_id, "usage": usage, "at": time.time()}
        self._save()

    def gpu_runtime(self, gpu: str) -> int | None:
        """The runtime overhead measured on this GPU model and driver (`Device.model_and_driver`)."""
        entry = self._entries.get(self.GPU_RUNTIME, {}).get(gpu)
        return int(entry["bytes"]) if entry else None

    def record_gpu_runtime(self, gpu: str, overhead: int, model_id: str) -> None:
        self._entries.setdefault(self.GPU_RUNTIME, {})[gpu] = {"bytes": overhead, "model": model_id,
                                                               "at": time.time()}
        self._save()

    def _save(self) -> None:
        try:
            write_private(self.path, json.dumps(self._entries, indent=1, sort_keys=True))
        except OSError as exc:
            log.warning(f"cannot save measured memory to {self.path}: {exc}")


def gpu_runtime(device: Device, ledger: MemoryLedger, backend: Backend | None = None) -> GpuRuntime:
    """A GPU's backend (`backend`, else the device's) and the runtime overhead a process carries there:
    measured on its model and driver once a model has run on it, else the backend's default."""
    own = Backend(device.backend or Backend.CUDA)
    backend = Backend(backend or own)
    learned = ledger.gpu_runtime(device.model_and_driver) if backend == own else None
    if learned is None:
        return GpuRuntime.default(backend)
    return replace(GpuRuntime.default(backend), runtime_bytes=learned, source=f"measured on {device.model_and_driver}")


class MemoryPlanner:
    def __init__(self, devices: dict[str, Device], ledger: MemoryLedger,
                 plan_launch: Callable[[ModelSpec], Launch]) -> None:
        self.devices = devices
        self.ledger = ledger
        self._plan_launch = plan_launch  # the launch as it would run, without pulling anything

    def budgets(self, config: BerthConfig) -> dict[str, int]:
        return budgets(self.devices, dict(config.memory.budget), config.memory.headroom_bytes)

    def gpu_runtime(self, name: str = GPU) -> GpuRuntime:
        return gpu_runtime(self.devices[name], self.ledger)

    def _gpu(self) -> GpuRuntime | None:
        """The GPU estimates place offloaded layers on (the first; None without one)."""
        return self.gpu_runtime() if GPU in self.devices else None

    def launch_args(self, spec: ModelSpec) -> LlamaServerArgs | None:
        """The llama.cpp flags `spec` runs with (its model file among them) as planned, without pulling;
        None for other engines, or a launch that cannot be planned."""
        try:
            return server_args(self._plan_launch(spec).argv)
        except (BerthError, OSError):
            return None

    def plan(self, spec: ModelSpec) -> ModelMemory:
        if spec.declared_memory:
            return ModelMemory(dict(spec.declared_memory), PlanSource.DECLARED)
        try:
            argv = self._plan_launch(spec).argv
        except BerthError as exc:
            return ModelMemory(None, PlanSource.UNKNOWN, exc.message)
        except OSError as exc:  # e.g. an unreadable model file while planning slots
            return ModelMemory(None, PlanSource.UNKNOWN, f"cannot plan its launch: {exc}")
        key = launch_identity(argv)
        measured = self.ledger.get(key) if key else None
        result = self._estimate(argv)
        estimated, parts = None, None
        if isinstance(result, MemoryEstimate):
            estimated = _spread_over_gpus(result, self.devices, self.gpu_runtime)
            parts = components(result, self.devices)
        if measured is not None:
            return ModelMemory(_combine(measured, estimated), PlanSource.MEASURED, "from its last run with these settings",
                               parts)
        if estimated is None:
            return ModelMemory(None, PlanSource.UNKNOWN, str(result))
        fitted = fit_placement(estimated, server_args(argv), self.devices)
        if fitted is not None:
            return ModelMemory(fitted[0], fitted[1], fitted[2] + self._runtime_note(), parts)
        return ModelMemory(estimated, PlanSource.ESTIMATED, "from the GGUF header and its flags" + self._runtime_note(),
                           parts)

    def _runtime_note(self) -> str:
        """Where each GPU's share includes the runtime overhead, and where that figure comes from."""
        notes = [f"{name} includes {format_bytes(runtime.runtime_bytes)} of {runtime.backend} runtime "
                 f"({runtime.source})" for name in sorted(self.devices) if name.startswith("gpu")
                 for runtime in [self.gpu_runtime(name)]]
        return "; " + "; ".join(notes) if notes else ""

    def learn_gpu_runtime(self, spec: ModelSpec, argv: list[str], gpu: str, process_bytes: int,
                          logged_buffers: int | None) -> int | None:
        """Keep what a GPU process holds besides llama.cpp's buffers (NVML's figure for its pids less
        the buffers its load log reports, or else the estimate's) as that GPU model and driver's runtime
        overhead, the largest seen; None when nothing is learned (no buffers to subtract)."""
        device = self.devices.get(gpu)
        if device is None:
            return None
        buffers = logged_buffers
        if buffers is None:
            result = self._estimate(argv)
            if not isinstance(result, MemoryEstimate) or GPU not in result.devices:
                return None
            planned = _spread_over_gpus(result, self.devices, self.gpu_runtime)
            buffers = planned.get(gpu, 0) - self.gpu_runtime(gpu).runtime_bytes
        overhead = process_bytes - buffers
        if buffers <= 0 or overhead <= 0:
            return None
        known = self.ledger.gpu_runtime(device.model_and_driver)
        if known is None or overhead > known:
            self.ledger.record_gpu_runtime(device.model_and_driver, overhead, spec.id)
            log.info(f"{gpu} ({device.model_and_driver}): a {device.backend or 'GPU'} process holds "
                     f"{format_bytes(overhead)} besides llama.cpp's buffers; plans on it include that from now on")
        return overhead

    def learn(self, spec: ModelSpec, argv: list[str], usage: dict[str, int]) -> ModelMemory:
        """Keep a measurement of `spec` run as `argv` (the peak per device so far); return the new plan."""
        key = launch_identity(argv)
        if key is not None and not spec.declared_memory:
            previous = self.ledger.get(key) or {}
            peak = {d: max(usage.get(d, 0), previous.get(d, 0)) for d in set(usage) | set(previous)}
            if peak != previous:
                self.ledger.record(key, spec.id, peak)
        return self.plan(spec)

    def host_mapped_bytes(self, argv: list[str]) -> int | None:
        """The bytes of a llama.cpp argv's weights that stay on the host as pages of the mapped file, as
        estimated; None when there is no estimate."""
        result = self._estimate(argv)
        return result.host_mapped_bytes if isinstance(result, MemoryEstimate) else None

    def swa_full_cost(self, argv: list[str]) -> int:
        """The KV bytes `--swa-full` adds to a llama.cpp argv (0 without it, or when it cannot be read)."""
        args = server_args(argv)
        if args is None or not args.get("model"):
            return 0
        try:
            return swa_full_cost(LaunchFiles.read(args).model, args, self._gpu())
        except (UnreadableModelFile, EstimateError):
            return 0

    def _estimate(self, argv: list[str]) -> MemoryEstimate | str:
        """The estimate, or why there is none."""
        args = server_args(argv)
        if args is None:
            return "not a llama.cpp server (or its flags are not readable); declare `memory:` for it in the config"
        if not args.get("model"):
            return "no --model file to read"
        try:
            return LaunchFiles.read(args).estimate(args, self._gpu())
        except UnreadableModelFile as exc:
            what = "the projector " if exc.projector else ""
            if exc.missing:
                return f"{exc.path} is not on disk yet (it is pulled at the first start)"
            return f"cannot read {what}{exc.path}: {exc.reason}"
        except EstimateError as exc:
            return str(exc)
