"""The vision encoder's compute buffer (`--mmproj`): what llama.cpp's clip loader (tools/mtmd/clip.cpp)
reserves, once at load, for encoding one warmup image."""

from __future__ import annotations

import math

from berth.core.gguf import GGUFHeader
from berth.engine.llama_args import LlamaServerArgs
from berth.memory.backends import Backend, flash_attention_kernel
from berth.memory.compute import F32, flash_as_asked

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
# families that warm up at a fixed size whatever the GGUF says (tools/mtmd/clip.cpp, load_hparams)
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
    if flash_as_asked(args, lambda: flash_attention_kernel(backend, head, head, 1, "f16", "f16")):
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
