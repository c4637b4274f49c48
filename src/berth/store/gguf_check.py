"""A structural check of GGUF files that catches truncation and corruption of the header.

It walks the header, the metadata and the tensor table, and checks that every
tensor's data lies inside the file. It reads only the header, so it costs
milliseconds even for large files; the sha256 check covers the data bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class GGUFInvalid(ValueError):
    pass


class _Reader:
    def __init__(self, fh, size: int) -> None:
        self.fh, self.size = fh, size

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise GGUFInvalid(f"file ends inside the header at byte {self.fh.tell()} (truncated?)")
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        length = self.unpack("Q")
        if length > self.size:
            raise GGUFInvalid(f"a string length of {length} bytes is larger than the file")
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALAR:
            return self.unpack(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("I"), self.unpack("Q")
            if count > self.size:
                raise GGUFInvalid(f"an array of {count} items is larger than the file")
            if item_kind in _SCALAR:  # skip without decoding: token lists hold 100k+ items
                self.take(count * struct.calcsize("<" + _SCALAR[item_kind]))
                return None
            return [self.value(item_kind) for _ in range(count)]
        raise GGUFInvalid(f"unknown metadata value type {kind}")


def check_gguf(path: str | Path) -> dict:
    """Raise GGUFInvalid unless `path` is a complete GGUF file; return a summary of it."""
    size = Path(path).stat().st_size
    with open(path, "rb") as fh:
        r = _Reader(fh, size)
        if r.take(4) != GGUF_MAGIC:
            raise GGUFInvalid("not a GGUF file (bad magic)")
        version = r.unpack("I")
        if version not in (2, 3):
            raise GGUFInvalid(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
        metadata: dict = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.unpack("I"))
        end_of_data = 0
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.unpack("Q") for _ in range(r.unpack("I"))]
            ggml_type, offset = r.unpack("I"), r.unpack("Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except ValueError:
                raise GGUFInvalid(f"tensor {name!r} has unknown type {ggml_type}") from None
            elements = 1
            for d in dims:
                elements *= d
            end_of_data = max(end_of_data, offset + elements // block * type_size)
            tensors.append(name)
        alignment = metadata.get("general.alignment") or DEFAULT_ALIGNMENT
        data_start = -(-fh.tell() // alignment) * alignment
    if data_start + end_of_data > size:
        raise GGUFInvalid(f"tensor data ends at byte {data_start + end_of_data} but the file has {size} bytes "
                          "(truncated)")
    return {"version": version, "tensors": len(tensors), "architecture": metadata.get("general.architecture"),
            "split_count": metadata.get("split.count")}
