"""The compute buffers of one ubatch's graph on each device, and llama.cpp's reading of -fa.

The graph's stages are counted in f32 rows of one ubatch: the feed-forward's products
(`shape.FFN_PRODUCTS`, src/llama-graph.cpp), the rest calibrated against llama.cpp's compute buffers
on the CPU (its `-lv 4` sizes, `bench/memory_fidelity.py`), with an rpc device standing in for a GPU,
and on CUDA against the H200 reference (tests/fixtures/cuda-h200), as each constant notes.
"""

from __future__ import annotations

from collections.abc import Callable

from berth.core.units import HOST
from berth.engine.llama_args import LlamaServerArgs
from berth.memory.backends import (
    QUANTIZED_CACHE_TYPES, Backend, GpuRuntime, f16_cache_copies, flash_attention_kernel, layer_embd_rows,
    offloads_host_weights,
)
from berth.memory.breakdown import MemoryEstimate
from berth.memory.placement import GPU, LayerPlacement, PlacedWeights, device_backend
from berth.memory.shape import CacheLayout, ModelShape

F32, F16 = 4, 2  # bytes per element of ggml's float types (ggml/src/ggml.c, type_traits)
SCORE_WIDTH_ROWS = 6.5  # beside the f32 scores without flash attention: rows of the query width (CPU)
NO_FLASH_QUERY_ROWS = 2  # the CPU graph without flash attention holds two rows of the query width more
CONVERSION_EMBD_ROWS = 5  # beside the f16 cache copies of CUDA's flash attention (H200 reference)
HOST_WEIGHT_EMBD_ROWS = 3  # beside a host weight copied to the GPU for its product (H200 reference)
INPUT_EMBD_ROWS = 4  # the graph's inputs the host keeps when the layers run elsewhere (rpc device)
NO_FLASH_INPUT_F16_ROWS = 1  # ...and without flash attention, one f16 row more (H200 reference)


def flash_as_asked(args: LlamaServerArgs, auto: Callable[[], bool]) -> bool:
    """-fa off and on as given; auto (the default) as `auto` finds it."""
    if args.switched_off("flash_attn"):
        return False
    return args.switched_on("flash_attn") or auto()


def flash_attention(args: LlamaServerArgs, shape: ModelShape, cache: CacheLayout, placement: LayerPlacement,
                    gpu: GpuRuntime | None) -> bool:
    """llama.cpp's reading of -fa auto: on for a quantized V cache (src/llama-context.cpp turns it on for
    that), else on when every device holding a layer has a kernel for that layer's attention."""
    return flash_as_asked(args, lambda: cache.type_v in QUANTIZED_CACHE_TYPES or all(
        flash_attention_kernel(device_backend(placement.device(layer), gpu), shape.key_length,
                               shape.value_length, shape.n_head // heads_kv, cache.type_k, cache.type_v)
        for layer, heads_kv in enumerate(shape.heads_kv) if heads_kv))


class ComputeGraph:
    """The compute buffers of one ubatch's graph, by the stage that peaks on each device."""

    def __init__(self, shape: ModelShape, cache: CacheLayout, flash: bool, gpu: GpuRuntime | None,
                 args: LlamaServerArgs) -> None:
        self.shape, self.cache, self.flash, self.gpu = shape, cache, flash, gpu
        self.ubatch = cache.ubatch
        # src/llama-graph.cpp, llm_graph_input_attn_*: the masks are f16 with flash attention
        mask_bytes = F16 if flash else F32
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

    def add_to(self, result: MemoryEstimate, placement: LayerPlacement, weights: PlacedWeights) -> None:
        with_layers = placement.with_layers()
        for device in with_layers:
            compute = self.layers(device_backend(device, self.gpu))
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
