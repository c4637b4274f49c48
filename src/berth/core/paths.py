"""Where berth keeps its data, and keeping it to the user berth runs as."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def berth_home() -> Path:
    """berth's data directory: `$BERTH_HOME`, default `~/.cache/berth`."""
    return Path(os.environ.get("BERTH_HOME") or Path.home() / ".cache" / "berth")


def private_dir(path: Path) -> Path:
    """`path` as a directory, it and every parent it had to create readable by this user alone (saved KV
    slots hold users' tokens; the ledger and store say what runs here). Existing directories keep their mode."""
    missing = []
    at = Path(path)
    while not at.exists():
        missing.append(at)
        at = at.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:  # made meanwhile by another process
            pass
    return Path(path)


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text` at once (through a partial file), readable by this user alone."""
    private_dir(path.parent)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "w") as fh:
        fh.write(text)
    os.replace(partial, path)
