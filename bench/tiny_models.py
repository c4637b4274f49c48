"""Tiny GGUF models that llama.cpp loads and runs (random weights), written with the `gguf` package:
a dense llama-style model and a mixture of experts (llama architecture with expert tensors). They
exist to check memory figures against llama.cpp's own, not to say anything sensible."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

VOCAB = 512


def write_llama(path: Path, n_layer: int = 4, n_embd: int = 256, n_head: int = 8, n_head_kv: int = 2,
                n_ff: int = 512, n_expert: int = 0, n_expert_used: int = 2, context: int = 32768,
                scale: float = 0.02, weights: bool = True) -> Path:
    """A llama-architecture GGUF; with `n_expert`, its feed-forward layers are experts. `scale` is the
    weights' standard deviation: larger ones make greedy output vary from token to token (small ones
    repeat one token), which a test comparing two placements of the same model needs.
    `weights=False` writes the header and tensor table only and leaves the data a hole of the right
    size (a sparse file): what the memory estimate reads, at the file size of the real model, without
    writing gigabytes."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_block_count(n_layer)
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(1)  # mostly f16
    if n_expert:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(n_expert_used)
    # a byte-level SentencePiece vocabulary: three control tokens, the 256 bytes, filler pieces
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(VOCAB - len(tokens))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (VOCAB - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def weight(name: str, *shape: int) -> None:
        if weights:
            writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float16))
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float16), 2 * int(np.prod(shape)))

    def norm(name: str, size: int) -> None:
        if weights:
            writer.add_tensor(name, np.ones(size, dtype=np.float32))
        else:
            writer.add_tensor_info(name, (size,), np.dtype(np.float32), 4 * size)

    head_dim = n_embd // n_head
    weight("token_embd.weight", VOCAB, n_embd)
    for i in range(n_layer):
        norm(f"blk.{i}.attn_norm.weight", n_embd)
        weight(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        weight(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        weight(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        weight(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        norm(f"blk.{i}.ffn_norm.weight", n_embd)
        if n_expert:
            weight(f"blk.{i}.ffn_gate_inp.weight", n_expert, n_embd)
            weight(f"blk.{i}.ffn_gate_exps.weight", n_expert, n_ff, n_embd)
            weight(f"blk.{i}.ffn_up_exps.weight", n_expert, n_ff, n_embd)
            weight(f"blk.{i}.ffn_down_exps.weight", n_expert, n_embd, n_ff)
        else:
            weight(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
            weight(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
            weight(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    norm("output_norm.weight", n_embd)
    weight("output.weight", VOCAB, n_embd)
    return _finish(writer, path) if weights else _finish_header_only(writer, path)


def write_big_llama(path: Path, n_layer: int = 12) -> Path:
    """A llama-architecture GGUF of about 90 MB of f16 weights per layer (1 GB at 12): a file whose
    reading shows in a start, for the page cache and sleep benchmarks."""
    return write_llama(path, n_layer=n_layer, n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, context=4096)


def write_gemma3_projector(path: Path, text_embd: int, image_size: int = 224, patch_size: int = 14,
                           n_embd: int = 128, n_ff: int = 256, n_layer: int = 2, n_head: int = 4,
                           merge: int = 4) -> Path:
    """A `--mmproj` GGUF of Gemma 3's kind (a SigLIP vision encoder, average pooling by `merge` per
    side, an RMS norm and a projection to the text model's width `text_embd`) that llama.cpp's clip
    loader accepts and encodes images with."""
    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "clip")
    writer.add_name(path.stem)
    writer.add_file_type(1)
    writer.add_string("clip.projector_type", "gemma3")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", image_size)
    writer.add_uint32("clip.vision.patch_size", patch_size)
    writer.add_uint32("clip.vision.embedding_length", n_embd)
    writer.add_uint32("clip.vision.feed_forward_length", n_ff)
    writer.add_uint32("clip.vision.projection_dim", text_embd)
    writer.add_uint32("clip.vision.block_count", n_layer)
    writer.add_uint32("clip.vision.attention.head_count", n_head)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_uint32("clip.vision.projector.scale_factor", merge)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def weight(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float16))

    def vector(name: str, size: int, value: float) -> None:
        writer.add_tensor(name, np.full(size, value, dtype=np.float32))

    n_patches = (image_size // patch_size) ** 2
    weight("v.patch_embd.weight", n_embd, 3, patch_size, patch_size)
    vector("v.patch_embd.bias", n_embd, 0.0)
    writer.add_tensor("v.position_embd.weight",
                      (rng.standard_normal((n_patches, n_embd)) * 0.02).astype(np.float32))
    for i in range(n_layer):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            weight(f"v.blk.{i}.{part}.weight", n_embd, n_embd)
            vector(f"v.blk.{i}.{part}.bias", n_embd, 0.0)
        for norm in ("ln1", "ln2"):
            vector(f"v.blk.{i}.{norm}.weight", n_embd, 1.0)
            vector(f"v.blk.{i}.{norm}.bias", n_embd, 0.0)
        weight(f"v.blk.{i}.ffn_up.weight", n_ff, n_embd)
        vector(f"v.blk.{i}.ffn_up.bias", n_ff, 0.0)
        weight(f"v.blk.{i}.ffn_down.weight", n_embd, n_ff)
        vector(f"v.blk.{i}.ffn_down.bias", n_embd, 0.0)
    vector("v.post_ln.weight", n_embd, 1.0)
    vector("v.post_ln.bias", n_embd, 0.0)
    vector("mm.soft_emb_norm.weight", n_embd, 1.0)
    weight("mm.input_projection.weight", n_embd, text_embd)
    return _finish(writer, path)


def _finish(writer: GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _finish_header_only(writer: GGUFWriter, path: Path) -> Path:
    """The header and tensor table as `_finish` writes them, then the file extended to where the last
    padded tensor would end, without writing the data."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    data_start = GGUFWriter.ggml_pad(writer.fout[0].tell(), writer.data_alignment)
    data_bytes = sum(GGUFWriter.ggml_pad(info.nbytes, writer.data_alignment)
                     for tensors in writer.tensors for info in tensors.values())
    writer.close()
    os.truncate(path, data_start + data_bytes)
    return path
