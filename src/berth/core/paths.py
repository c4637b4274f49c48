"""Where berth keeps its data."""

from __future__ import annotations

import os
from pathlib import Path


def berth_home() -> Path:
    """berth's data directory: `$BERTH_HOME`, default `~/.cache/berth`."""
    return Path(os.environ.get("BERTH_HOME") or Path.home() / ".cache" / "berth")
