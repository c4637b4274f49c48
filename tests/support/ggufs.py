"""Small real GGUF files, written with the `gguf` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter


def write_gguf(path: Path, n_tensors: int = 4, elements: int = 4096, split: tuple[int, int] | None = None,
               arch: str = "llama") -> Path:
    """A valid GGUF with `n_tensors` float32 tensors; `split=(index, count)` adds split metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(n_tensors)
    if split is not None:
        writer.add_uint16("split.no", split[0])
        writer.add_uint16("split.count", split[1])
    offset = (split[0] * 1000) if split else 0
    for i in range(n_tensors):
        data = np.arange(elements, dtype=np.float32) + i + offset
        writer.add_tensor(f"blk.{i + offset}.ffn_up.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
