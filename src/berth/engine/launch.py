"""The one place that turns a model spec into the argv that is actually executed."""

from __future__ import annotations

import sys

from berth.config import ModelSpec
from berth.engine.binary import find_llama_server

BARE_LLAMA_SERVER = "llama-server"


def worker_argv() -> list[str]:
    """How to run `berth worker` with this very interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "berth.cli", "worker"]


def build_launch_argv(spec: ModelSpec) -> list[str]:
    """Resolve the program of a model's cmd.

    A bare `llama-server` becomes the binary `find_llama_server` picks, or the
    built-in worker when there is none; a bare `berth` is this berth. Anything
    else, absolute paths included, runs as written.
    """
    program, rest = spec.argv[0], list(spec.argv[1:])
    if program == BARE_LLAMA_SERVER:
        binary = find_llama_server()
        return [binary, *rest] if binary else [*worker_argv(), *rest]
    if program == "berth":
        return [sys.executable, "-m", "berth.cli", *rest]
    return [program, *rest]
