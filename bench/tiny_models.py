"""Tiny GGUF models that llama.cpp loads and runs (random weights), written with the `gguf` package:
a dense llama-style model and a mixture of experts (llama architecture with expert tensors). They
exist to check memory figures against llama.cpp's own, not to say anything sensible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

VOCAB = 512


def write_llama(path: Path, n_layer: int = 4, n_embd: int = 256, n_head: int = 8, n_head_kv: int = 2,
                n_ff: int = 512, n_expert: int = 0, n_expert_used: int = 2, context: int = 32768,
                scale: float = 0.02) -> Path:
    """A llama-architecture GGUF; with `n_expert`, its feed-forward layers are experts. `scale` is the
    weights' standard deviation: larger ones make greedy output vary from token to token (small ones
    repeat one token), which a test comparing two placements of the same model needs."""
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
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float16))

    def norm(name: str, size: int) -> None:
        writer.add_tensor(name, np.ones(size, dtype=np.float32))

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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
