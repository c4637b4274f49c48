"""What an estimate says: bytes per device by kind (`memory.estimate.estimate` fills these in), and the
error for settings it cannot honour."""

from __future__ import annotations

from dataclasses import dataclass, field


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
