"""What identifies a launch: its model file, and the flags that decide what the server holds.

Both the memory ledger (a measurement holds for the same launch) and the KV slot
directories (a save restores only into the same KV layout) key on this; they
differ only in which flags count.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from berth.engine.llama_args import ArgvError, LlamaServerArgs

# The flags a saved KV slot depends on, with llama-server's defaults.
KV_LAYOUT: dict[str, Any] = {"ctx_size": 0, "parallel": 1, "cache_type_k": "f16", "cache_type_v": "f16",
                             "swa_full": None}


def launch_settings(args: LlamaServerArgs, flags: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The model file's real path, size and mtime, plus the typed values of `flags` (their defaults when
    absent) or, without `flags`, the whole argv less placement flags. None when the model file is gone."""
    settings: dict[str, Any] = {}
    model = args.get("model")
    if model:
        try:
            stat = os.stat(model)
        except OSError:
            return None
        settings.update(model=os.path.realpath(model), model_size=stat.st_size, model_mtime_ns=stat.st_mtime_ns)
    if flags is None:
        settings["argv"] = args.placement_free()
    else:
        settings.update({dest: args.get(dest, default) for dest, default in flags.items()})
    return settings


def settings_digest(settings: dict[str, Any], length: int = 16) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:length]


def launch_identity(argv: list[str]) -> str | None:
    """The memory ledger's key for an executed argv (any engine: `--port` and friends are left out by the
    flag table; an argv the table cannot read counts as written). None when its model file is gone."""
    try:
        args = LlamaServerArgs.parse(argv)
    except ArgvError:
        return settings_digest({"argv": list(argv)}, 24)
    settings = launch_settings(args)
    return settings_digest(settings, 24) if settings is not None else None
