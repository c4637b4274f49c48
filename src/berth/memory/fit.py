"""Searching launch settings that fit memory budgets, on top of the pure estimate."""

from __future__ import annotations

from dataclasses import dataclass

from berth.engine.llama_args import LlamaServerArgs
from berth.memory.backends import Backend, GpuRuntime
from berth.memory.estimate import CTX_PAD, GPU, MemoryEstimate, estimate
from berth.memory.devices import cpu_repacked_types
from berth.core.units import SizeError, device_key, parse_size
from berth.core.gguf import GGUFHeader


class BudgetError(ValueError):
    pass


def parse_budget(text: str) -> dict[str, int]:
    """`gpu0=24GiB,ram=20GiB` -> {"gpu0": bytes, "host": bytes}."""
    budget: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, amount = part.partition("=")
        try:
            if not sep:
                raise SizeError("no '='")
            budget[device_key(name)] = parse_size(amount)
        except SizeError:
            raise BudgetError(f"{part!r} is not DEVICE=SIZE; write for example gpu0=24GiB,ram=20GiB") from None
    if not budget:
        raise BudgetError("the budget is empty; write for example gpu0=24GiB,ram=20GiB")
    return budget


def fits(result: MemoryEstimate, budget: dict[str, int], headroom: float) -> bool:
    for device, usage in result.devices.items():
        limit = budget.get(device)
        if limit is not None and usage.total_bytes > limit * (1 - headroom):
            return False
        if limit is None and device == GPU and usage.total_bytes:
            return False  # no budget for a GPU means no GPU
    return True


@dataclass
class FitResult:
    flags: list[str]  # llama-server flags to use
    estimate: MemoryEstimate


def find_fit(header: GGUFHeader, args: LlamaServerArgs, budget: dict[str, int], headroom: float = 0.05,
             max_context: bool = False, projector: GGUFHeader | None = None,
             gpu: GpuRuntime | None = None) -> FitResult | None:
    """The most GPU layers (then the fewest CPU-held expert layers, then optionally the largest
    context) whose estimate, with the `--mmproj` projector's share and `gpu`'s runtime overhead, fits
    every budget; None when even all-on-host does not fit. A GPU budget without `gpu` plans for CUDA."""
    n_layer = int(header.arch_value("block_count") or 0)
    has_gpu = GPU in budget
    if has_gpu and gpu is None:
        gpu = GpuRuntime.default(Backend.CUDA)
    moe = any("_exps." in t.name for t in header.tensors)

    def trial(ngl: int, n_cpu_moe: int, ctx: int | None = None) -> MemoryEstimate:
        trial_args = args.without("n_gpu_layers", "n_cpu_moe", "cpu_moe")
        trial_args.set("n_gpu_layers", ngl)
        if n_cpu_moe:
            trial_args.set("n_cpu_moe", n_cpu_moe)
        if ctx is not None:
            trial_args.set("ctx_size", ctx)
        return estimate(header, trial_args, gpu if has_gpu else None, cpu_repacked_types(), projector)

    flags: list[str] = []
    search_ctx = CTX_PAD if max_context else None  # placement first at the smallest context, then grow it
    if moe and has_gpu:
        # every layer on the GPU, experts of the first K layers on the host: the usual MoE split
        choice = next((k for k in range(n_layer + 1) if fits(trial(n_layer + 1, k, search_ctx), budget, headroom)),
                      None)
        if choice is None:
            return None
        ngl, n_cpu_moe = n_layer + 1, choice
        flags += ["-ngl", str(ngl)] + (["--n-cpu-moe", str(n_cpu_moe)] if n_cpu_moe else [])
    else:
        top = n_layer + 1 if has_gpu else 0
        found = next((n for n in range(top, -1, -1) if fits(trial(n, 0, search_ctx), budget, headroom)), None)
        if found is None:
            return None
        ngl = found
        n_cpu_moe = 0
        flags += ["-ngl", str(ngl)]
    if max_context:
        low, high = CTX_PAD, int(header.arch_value("context_length") or CTX_PAD)
        while low < high:  # the estimate grows with the context, so bisect on multiples of CTX_PAD
            mid = ((low + high) // 2 + CTX_PAD) // CTX_PAD * CTX_PAD
            mid = min(mid, high)
            if fits(trial(ngl, n_cpu_moe, mid), budget, headroom):
                low = mid
            else:
                high = mid - CTX_PAD
        flags += ["-c", str(low)]
        return FitResult(flags, trial(ngl, n_cpu_moe, low))
    return FitResult(flags, trial(ngl, n_cpu_moe))


def swa_full_cost(header: GGUFHeader, args: LlamaServerArgs, gpu: GpuRuntime | None = None) -> int:
    """The KV bytes `--swa-full` adds to these settings (0 without it, or without sliding-window layers)."""
    if not args.get("swa_full"):
        return 0
    kv = [sum(d.kv_bytes for d in estimate(header, settings, gpu).devices.values())
          for settings in (args, args.without("swa_full"))]
    return kv[0] - kv[1]
