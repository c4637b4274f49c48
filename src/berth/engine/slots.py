"""Where a model's KV slots are saved, and the launch flags persistence needs.

Saved slots are only valid for the same model file and KV layout, so each set
of launch settings gets its own directory, named by a hash of those settings:
`<store>/.slots/<model id>/<settings hash>/slot-<id>.bin`. A file can then
never be restored into an incompatible server; directories of other settings
are discarded when the model starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

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


def plan_slot_persistence(model_id: str, args: LlamaServerArgs, slots_root: Path, per_model_max_bytes: int,
                          total_max_bytes: int) -> SlotPlan | None:
    """Add --slot-save-path, --slots (and --swa-full where needed) to `args`; None if no model file to key on."""
    model = args.get("model")
    if not model or not os.path.isfile(model):
        return None
    stat = os.stat(model)
    try:
        sliding = bool(read_model_header(os.path.realpath(model)).arch_value("attention.sliding_window"))
    except (GGUFInvalid, OSError):
        return None
    swa_full_added = sliding and not args.get("swa_full")
    if swa_full_added:
        args.set("swa_full", True)
    args.items = [item for item in args.items if item.spec is None or item.spec.dest != "no_slots"]
    args.set("slots", True)
    settings = {
        "model": os.path.realpath(model), "model_size": stat.st_size, "model_mtime_ns": stat.st_mtime_ns,
        "ctx_size": args.get("ctx_size", 0), "parallel": args.get("parallel", 1),
        "cache_type_k": args.get("cache_type_k", "f16"), "cache_type_v": args.get("cache_type_v", "f16"),
        "swa_full": args.get("swa_full"),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    directory = slots_root / model_id / digest
    args.set("slot_save_path", str(directory))
    return SlotPlan(directory, settings, swa_full_added, per_model_max_bytes, total_max_bytes)


def slot_usage(model_root: Path) -> tuple[int, int]:
    """(files, bytes) of saved slots under a model's slot directory."""
    files = [p for p in model_root.rglob("slot-*.bin")] if model_root.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)
