"""Where a model's KV slots are saved, and the launch flags persistence needs.

Saved slots are only valid for the same model file and KV layout, so each set
of launch settings gets its own directory, named by a hash of those settings:
`<store>/.slots/<model id>/<settings hash>/slot-<id>.bin`. A file can then
never be restored into an incompatible server; directories of other settings
are discarded when the model starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from berth.engine.identity import KV_LAYOUT, launch_settings, settings_digest
from berth.engine.llama_args import LlamaServerArgs
from berth.core.gguf import GGUFInvalid, read_model_header

SLOTS_DIR = ".slots"  # under the store root


@dataclass(frozen=True)
class SlotPlan:
    directory: Path
    settings: dict
    swa_full_added: bool  # the model has sliding-window layers: restored slots are reused only with --swa-full
    per_model_max_bytes: int
    total_max_bytes: int

    @property
    def model_root(self) -> Path:
        return self.directory.parent

    @property
    def slots_root(self) -> Path:
        return self.directory.parent.parent


SWA_FULL_UNASKED = ("sliding-window layers reuse a saved slot only with --swa-full, which keeps the whole "
                    "context in every layer's cache; set kvPersistence: true to save slots at that cost")


def sliding_window(args: LlamaServerArgs) -> bool | None:
    """Whether the model file of `args` has sliding-window layers; None when it cannot be read."""
    model = args.get("model")
    if not model or not os.path.isfile(model):
        return None
    try:
        return bool(read_model_header(os.path.realpath(model)).arch_value("attention.sliding_window"))
    except (GGUFInvalid, OSError):
        return None


def plan_slot_persistence(model_id: str, args: LlamaServerArgs, slots_root: Path, per_model_max_bytes: int,
                          total_max_bytes: int, asked: bool) -> SlotPlan | str:
    """Add --slot-save-path and --slots to `args`, and --swa-full for a sliding-window model when
    persistence was `asked` for (kvPersistence: true) rather than on by default, since it grows the KV
    cache. Otherwise why slots are not saved: no model file to key on, or a sliding-window model that
    did not ask."""
    sliding = sliding_window(args)
    if sliding is None:
        return "no model file to key saved slots on"
    swa_full_added = sliding and not args.get("swa_full")
    if swa_full_added and not asked:
        return SWA_FULL_UNASKED
    if swa_full_added:
        args.set("swa_full", True)
    args.set("slots", True)
    settings = launch_settings(args, KV_LAYOUT)
    if settings is None:
        return "no model file to key saved slots on"
    directory = slots_root / model_id / settings_digest(settings)
    args.set("slot_save_path", str(directory))
    return SlotPlan(directory, settings, swa_full_added, per_model_max_bytes, total_max_bytes)


def slot_usage(model_root: Path) -> tuple[int, int]:
    """(files, bytes) of saved slots under a model's slot directory."""
    files = [p for p in model_root.rglob("slot-*.bin")] if model_root.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)
