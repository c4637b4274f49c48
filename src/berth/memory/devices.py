"""What memory the machine has, and what a model server process really uses.

Host RAM respects cgroup limits (v2 `memory.max`, v1 `memory.limit_in_bytes`):
in a container MemTotal is the host's, not ours. NVIDIA GPUs are read through
NVML (`nvidia-ml-py`) when the driver library is present; without it the list
of GPUs is empty and every layer is planned on the host, as llama.cpp's CPU
build would place it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from berth.core.gguf import model_files
from berth.core.procfs import anonymous_bytes, group_pids, mapped_resident_bytes
from berth.core.units import HOST, rpc_device
from berth.engine.llama_args import LlamaServerArgs
from berth.engine.rpc import buffer_endpoint
from berth.memory.backends import Backend

log = logging.getLogger("berth.memory")

_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_NO_LIMIT = 1 << 60  # cgroup v1 writes a huge number for "unlimited"


@dataclass(frozen=True)
class Device:
    name: str  # "host", "gpu0", "gpu1", ...
    description: str
    total_bytes: int
    free_bytes: int
    backend: str = ""  # a GPU's llama.cpp backend (memory.backends.Backend): "cuda" for what NVML lists
    driver: str = ""  # a GPU's driver version

    @property
    def model_and_driver(self) -> str:
        """What a GPU's runtime overhead depends on: the GPU model and its driver."""
        return f"{self.description} (driver {self.driver or 'unknown'})"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) of this process's memory cgroup, or None when unlimited."""
    for limit_file, usage_file in ((_CGROUP_V2 / "memory.max", _CGROUP_V2 / "memory.current"),
                                   (_CGROUP_V1 / "memory.limit_in_bytes", _CGROUP_V1 / "memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < _NO_LIMIT:
            return limit, _read_int(usage_file) or 0
    return None


def host_device() -> Device:
    memory = psutil.virtual_memory()  # `available` is MemAvailable on Linux
    total, free = memory.total, memory.available
    description = "host RAM"
    cgroup = _cgroup_limit()
    if cgroup is not None and cgroup[0] < total:
        limit, usage = cgroup
        total, free = limit, min(free, max(limit - usage, 0))
        description = "host RAM (cgroup limit)"
    return Device(HOST, description, total, free)


@contextmanager
def _nvml() -> Iterator[Any]:
    """The initialised pynvml module for the block (shut down after it), or None without an NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def gpu_devices() -> list[Device]:
    with _nvml() as nvml:
        if nvml is None:
            return []
        devices = []
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                devices.append(Device(f"gpu{index}", _text(nvml.nvmlDeviceGetName(handle)), int(memory.total),
                                      int(memory.free), Backend.CUDA, driver))
        except nvml.NVMLError as exc:
            log.warning(f"NVML failed while listing GPUs ({exc}); planning without GPUs")
            return []
        return devices


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def inventory() -> dict[str, Device]:
    return {d.name: d for d in (host_device(), *gpu_devices())}


# llama.cpp's load log at `-lv 4` or above: "<buffer type> (model|KV|compute|output) buffer size = N MiB".
_BUFFER_LINE = re.compile(r"(\S+)\s+(?:model|KV|compute|output)\s+buffer size\s*=\s*([\d.]+)\s*MiB")
_GPU_BUFFER = re.compile(r"^(?:CUDA|ROCm|Vulkan|SYCL|MUSA|CANN|Metal|MTL|OpenCL)(\d*)$", re.IGNORECASE)
# A `--mmproj` projector's weights have no buffer line: clip.cpp names its backend, then their size.
_PROJECTOR_BACKEND = re.compile(r"CLIP using (\S+) backend")
_PROJECTOR_WEIGHTS = re.compile(r"load_hparams: model size:\s*([\d.]+)\s*MiB")


def buffer_device(buffer_type: str) -> str:
    """The device of a llama.cpp buffer type or backend name: `CUDA0` -> gpu0, `Vulkan1 (name)` -> gpu1;
    `CPU`, `CPU_REPACK`, `Host` and pinned `CUDA_Host` buffers -> host."""
    token = buffer_type.split()[0] if buffer_type.split() else ""
    if token.endswith("_Host"):
        return HOST
    endpoint = buffer_endpoint(token)
    if endpoint is not None:
        return rpc_device(endpoint)
    gpu = _GPU_BUFFER.match(token.split("_")[0])
    return f"gpu{gpu.group(1) or 0}" if gpu else HOST


def parse_buffer_log(lines: list[str]) -> dict[str, int]:
    """Bytes per device from llama.cpp's buffer-size log lines (pinned host buffers count as host),
    with a `--mmproj` projector's weights on the backend clip.cpp says it uses (its compute buffer
    has a line of its own).

    The only per-device figure for GPUs that NVML does not see (ROCm, Vulkan, Metal...).
    """
    usage: dict[str, int] = {}
    projector_device = HOST
    for line in lines:
        if (buffer := _BUFFER_LINE.search(line)) is not None:
            device, mib = buffer_device(buffer.group(1)), buffer.group(2)
        elif (backend := _PROJECTOR_BACKEND.search(line)) is not None:
            projector_device = buffer_device(backend.group(1))
            continue
        elif (weights := _PROJECTOR_WEIGHTS.search(line)) is not None:
            device, mib = projector_device, weights.group(1)
        else:
            continue
        usage[device] = usage.get(device, 0) + int(float(mib) * 1024 * 1024)
    return usage


def weight_files(args: LlamaServerArgs | None) -> frozenset[str]:
    """The real paths of the weight files a llama.cpp server maps: the model (every part of a split one),
    the projector and the draft model."""
    if args is None:
        return frozenset()
    paths = [args.get("model"), args.get("mmproj"), args.get("model_draft")]
    return frozenset(os.path.realpath(part) for path in paths if path for part in model_files(path))


def measure_group(pgid: int, files: frozenset[str] = frozenset(), host_weights: int | None = None
                  ) -> dict[str, int]:
    """Bytes a process group holds: on the host, its members' anonymous memory plus the resident pages
    they map of the weight `files`, up to `host_weights` (the bytes of the weights that stay on the host, when
    known); per GPU, what NVML reports for its pids (allocations there are committed at load, so current
    is peak).

    Not the peak resident size: loading maps the file and touches every page of it, the pages of tensors
    uploaded to a device too, so a fully offloaded model peaks near its file size and keeps a fraction;
    pages of device tensors that stay mapped between host tensors were read once and are the first the
    kernel drops, hence the cap. Weights copied into anonymous memory (`--load-mode none`) count as
    anonymous."""
    pids = group_pids(pgid)
    mapped = sum(mapped_resident_bytes(pid, files) for pid in pids)
    if host_weights is not None:
        mapped = min(mapped, host_weights)
    usage = {HOST: sum(anonymous_bytes(pid) for pid in pids) + mapped}
    if not pids:
        return usage
    with _nvml() as nvml:
        if nvml is None:
            return usage
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                used = sum(p.usedGpuMemory or 0 for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                           if p.pid in pids)
                if used:
                    usage[f"gpu{index}"] = int(used)
        except nvml.NVMLError as exc:
            log.debug(f"NVML could not measure pids {pids}: {exc}")
    return usage


@functools.cache
def cpu_repacked_types(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[int]:
    """The weight types this machine's CPU backend repacks into a copy of their own (x86 flags)."""
    from berth.memory.estimate import REPACKED_WITH_AVX2, REPACKED_WITH_AVX512

    try:
        flags = set(next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")),
                         "").split())
    except OSError:
        return frozenset()
    if "avx512f" in flags:
        return REPACKED_WITH_AVX512
    return REPACKED_WITH_AVX2 if "avx2" in flags else frozenset()
