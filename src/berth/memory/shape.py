"""The model's hyperparameters and its KV cache's layout, each read once: from the GGUF header
(`ModelShape`) and from the launch settings as llama.cpp reads them (`CacheLayout`)."""

from __future__ import annotations

from dataclasses import dataclass

from berth.core.gguf import GGUFHeader
from berth.engine.llama_args import LlamaServerArgs
from berth.memory.backends import QUANTIZED_CACHE_TYPES
from berth.memory.breakdown import EstimateError

CTX_PAD = 256  # src/llama-context.cpp: n_ctx and each stream's cells are padded to this
DEFAULT_UBATCH = 512  # common/common.h: n_ubatch
# bytes per element of each KV cache type (block bytes / elements per block, ggml/src/ggml-common.h)
CACHE_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
}
# f32 products per token of the feed-forward (src/llama-graph.cpp: build_ffn and build_moe_ffn keep the
# gate, up and down products)
FFN_PRODUCTS = 3
# Architectures whose sliding-window layers follow a fixed pattern (every Nth layer is global) when the
# GGUF does not say so itself: `load_swa_pattern` in src/models/gemma2.cpp, gemma3.cpp, cohere2.cpp and
# openai-moe.cpp (gpt-oss).
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}
TOKEN_EMBEDDING = "token_embd.weight"


def pad(value: int, to: int = CTX_PAD) -> int:
    return -(-value // to) * to


def _per_layer(value, n_layer: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value or 0)] * n_layer


def _sliding_layers(header: GGUFHeader, n_layer: int, window: int) -> list[bool]:
    """Which layers use sliding-window attention (`window`: the model's, 0 without)."""
    if not window:
        return [False] * n_layer
    pattern = header.arch_value("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return [bool(p) for p in pattern]
    period = int(pattern) if isinstance(pattern, int) and pattern > 0 else _SWA_PATTERN.get(header.architecture or "", 0)
    if not period:
        return [True] * n_layer  # unknown pattern: every layer windowed (llama.cpp's default for such archs)
    return [(layer + 1) % period != 0 for layer in range(n_layer)]


def _vocab_from_embedding(header: GGUFHeader) -> int:
    """The vocabulary size from the embedding's shape (the token list itself is not decoded)."""
    for tensor in header.tensors:
        if tensor.name == TOKEN_EMBEDDING and len(tensor.dims) == 2:
            return int(tensor.dims[1])
    return 0


@dataclass(frozen=True)
class ModelShape:
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
    def of(cls, header: GGUFHeader) -> ModelShape:
        n_layer = int(header.arch_value("block_count") or 0)
        if not n_layer:
            raise EstimateError("the GGUF has no <arch>.block_count; cannot place layers")
        n_embd = int(header.arch_value("embedding_length") or 0)
        n_head = int(header.arch_value("attention.head_count") or 1)
        n_ff = _per_layer(header.arch_value("feed_forward_length"), 1)[0]
        window = int(header.arch_value("attention.sliding_window") or 0)
        return cls(
            n_layer=n_layer, n_embd=n_embd, n_head=n_head,
            heads_kv=tuple(_per_layer(header.arch_value("attention.head_count_kv", n_head), n_layer)),
            key_length=int(header.arch_value("attention.key_length") or n_embd // n_head),
            value_length=int(header.arch_value("attention.value_length") or n_embd // n_head),
            n_ff=n_ff, n_expert=int(header.arch_value("expert_count") or 0),
            experts_used=int(header.arch_value("expert_used_count") or 1),
            n_ff_expert=int(header.arch_value("expert_feed_forward_length") or n_ff),
            n_vocab=int(header.arch_value("vocab_size") or _vocab_from_embedding(header)),
            window=window, sliding=tuple(_sliding_layers(header, n_layer, window)),
            context_length=int(header.arch_value("context_length") or 0))

    @property
    def query_width(self) -> int:
        return self.n_head * self.key_length

    @property
    def feed_forward(self) -> int:
        """f32 elements per token of the feed-forward's products (the used experts' for a MoE)."""
        return FFN_PRODUCTS * (self.n_ff_expert * self.experts_used if self.n_expert else self.n_ff)


@dataclass(frozen=True)
class CacheLayout:
    """The KV cache's layout and llama.cpp's reading of the flags that shape the graph."""

    type_k: str
    type_v: str
    streams: int
    kv_cells: int  # per stream
    swa_cells: int  # per stream, 0 without sliding-window layers
    ubatch: int  # the tokens of the graph llama.cpp sizes its compute buffers for
    parallel: int

    @classmethod
    def of(cls, shape: ModelShape, args: LlamaServerArgs) -> CacheLayout:
        ctx = args.get("ctx_size") or shape.context_length
        parallel, unified = args.sequences()
        ubatch = min(args.get("ubatch_size") or DEFAULT_UBATCH, pad(ctx) or DEFAULT_UBATCH)
        type_k, type_v = (args.get("cache_type_k") or "f16").lower(), (args.get("cache_type_v") or "f16").lower()
        for flag, cache_type in (("--cache-type-k", type_k), ("--cache-type-v", type_v)):
            if cache_type not in CACHE_TYPE_BYTES:
                raise EstimateError(f"{flag} {cache_type!r} is not a KV cache type; use one of "
                                    f"{', '.join(CACHE_TYPE_BYTES)}")
        if type_v in QUANTIZED_CACHE_TYPES and args.switched_off("flash_attn"):
            raise EstimateError(f"--cache-type-v {type_v} needs flash attention, which -fa off turns off; "
                                "use -fa on (or auto), or an f16 V cache")
        kv_cells = pad(ctx) if unified else pad(ctx // parallel)  # each stream is padded on its own
        swa_cells = 0
        if shape.window and any(shape.sliding):
            wanted = pad(shape.window * (parallel if unified else 1) + (args.get("ubatch_size") or DEFAULT_UBATCH))
            swa_cells = kv_cells if args.get("swa_full") else min(kv_cells, wanted)
        return cls(type_k, type_v, 1 if unified else parallel, kv_cells, swa_cells, ubatch, parallel)

    def cells(self, shape: ModelShape, layer: int) -> int:
        return self.swa_cells if shape.sliding[layer] and self.swa_cells else self.kv_cells
