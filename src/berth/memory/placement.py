"""Which device holds each layer and weight: llama.cpp's reading of -ngl, -ts, --rpc and -ot
(src/llama-model.cpp, `load_tensors`)."""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from berth.core.units import HOST, rpc_device
from berth.engine.llama_args import LlamaServerArgs
from berth.engine.rpc import buffer_endpoint
from berth.memory.backends import Backend, GpuRuntime
from berth.memory.breakdown import EstimateError

GPU = "gpu0"


def _gpu_layers(args: LlamaServerArgs, n_layer: int, offload_devices: list[str]) -> int:
    if not offload_devices:
        return 0
    value = args.get("n_gpu_layers")
    if value in (None, "auto", "-1", "all"):
        return n_layer + 1
    try:
        return max(int(value), 0)
    except ValueError:
        raise EstimateError(f"-ngl {value!r} is not a number, 'auto' or 'all'") from None


def offload_devices(args: LlamaServerArgs, has_gpu: bool) -> list[str]:
    """The devices layers may go to, in llama.cpp's order: rpc servers (`--rpc`) first, then the GPU."""
    rpc = [rpc_device(e.strip()) for e in (args.get("rpc") or "").split(",") if e.strip()]
    return rpc + ([GPU] if has_gpu else [])


class LayerPlacement:
    """Which device holds each layer (the output layer is layer n_layer): the last `ngl` layers go to
    the offload devices, shared by -ts as cumulative fractions (evenly without -ts)."""

    def __init__(self, args: LlamaServerArgs, n_layer: int, devices: list[str]) -> None:
        self.devices, self.n_layer = devices, n_layer
        self.ngl = min(_gpu_layers(args, n_layer, devices), n_layer + 1)
        self.first = n_layer + 1 - self.ngl
        written = [float(x) for x in re.split(r"[,/]", args.get("tensor_split") or "") if x.strip()]
        shares = (written + [0.0] * len(devices))[:len(devices)]
        if sum(shares) <= 0:
            shares = [1.0] * len(devices)
        total, running = sum(shares), 0.0
        self.bounds: list[float] = []
        for share in shares:
            running += share / total
            self.bounds.append(running)

    def device(self, layer: int) -> str:
        if layer < self.first or not self.devices:
            return HOST
        position = (layer - self.first) / self.ngl
        return self.devices[min(bisect.bisect_right(self.bounds, position), len(self.devices) - 1)]

    def with_layers(self) -> set[str]:
        """The offload devices that hold a layer (the output layer included)."""
        return {self.device(layer) for layer in range(self.n_layer + 1)} - {HOST}


@dataclass
class PlacedWeights:
    """What the graph needs to know of the weights' placement."""

    experts_on: set[str] = field(default_factory=set)  # devices holding experts of layers they do not hold
    largest_on_host: int = 0  # bytes of the largest host-resident weight a matrix product reads


def override_device(name: str, overrides: list[str]) -> str | None:
    """The device of the first `-ot PATTERN=BUFFER` rule that matches (llama.cpp takes the first)."""
    for rules in overrides:
        for rule in rules.split(","):
            pattern, _, buffer_type = rule.rpartition("=")
            if not pattern or not re.search(pattern, name):
                continue
            endpoint = buffer_endpoint(buffer_type)
            if endpoint is not None:
                return rpc_device(endpoint)
            return HOST if buffer_type.strip().upper().startswith("CPU") else GPU
    return None


def device_backend(device: str, gpu: GpuRuntime | None) -> Backend:
    """The backend computing on a device: the GPU's, else the CPU's (berth's rpc agents serve CPUs)."""
    return gpu.backend if device == GPU and gpu is not None else Backend.CPU
