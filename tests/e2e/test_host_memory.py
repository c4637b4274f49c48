"""Host memory that stays, measured by berth on the real llama-server, with a local ggml-rpc-server standing
in for a GPU (every layer offloaded there, as `-ngl 99` does to a GPU): a fully offloaded model keeps a
fraction of its file resident after loading it (the pages of uploaded tensors are not counted), and a model
whose experts stay on the host still counts them. Also `--load-mode none`: the weights copied into
anonymous memory count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import requests

from tests.e2e.conftest import llama_server_binary, rpc_server_binary
from tests.support.harness import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import memory_fidelity  # noqa: E402
from tiny_models import write_llama  # noqa: E402

MIB = 1024**2


def serve_and_measure(berth, start_port: int, model: Path, flags: str) -> dict[str, int]:
    """berth's measurement of the model after one request (its plan's measured bytes per device)."""
    binary = llama_server_binary()
    b = berth(f"startPort: {start_port}\nmodels:\n  m: {{cmd: \"{binary} -m {model} --port ${{PORT}} -t 2 "
              f"-c 512 -np 1 --no-warmup {flags}\"}}\n")
    body = {"model": "m", "prompt": "hello", "max_tokens": 2}
    assert requests.post(b.url + "/v1/completions", json=body, timeout=300).status_code == 200
    wait_until(lambda: "measured_bytes" in b.running()["m"]["memory"], 60, "berth's measurement")
    return b.running()["m"]["memory"]["measured_bytes"]


def test_a_fully_offloaded_model_keeps_under_half_its_file_on_the_host(berth, start_port, tmp_path):
    rpc_server_binary()
    model = write_llama(tmp_path / "dense.gguf", n_layer=6, n_embd=1024, n_head=8, n_head_kv=2, n_ff=4096)
    size = os.path.getsize(model)
    with memory_fidelity.local_rpc_server() as endpoint:
        measured = serve_and_measure(berth, start_port, model, f"--rpc {endpoint} -ngl 99")
    assert 0 < measured["host"] < size / 2, (measured, size)


def test_experts_kept_on_the_host_stay_counted(berth, start_port, tmp_path):
    rpc_server_binary()
    model = write_llama(tmp_path / "moe.gguf", n_layer=4, n_embd=1024, n_head=8, n_head_kv=2, n_ff=1024,
                        n_expert=8)
    experts = 4 * 3 * 8 * 1024 * 1024 * 2  # layers x gate/up/down x experts x n_ff x n_embd x f16
    with memory_fidelity.local_rpc_server() as endpoint:
        measured = serve_and_measure(berth, start_port, model, f"--rpc {endpoint} -ngl 99 -ot exps=CPU")
    assert measured["host"] >= experts, (measured, experts)


def test_weights_copied_into_anonymous_memory_count(berth, start_port, tmp_path):
    model = write_llama(tmp_path / "dense.gguf", n_layer=6, n_embd=1024, n_head=8, n_head_kv=2, n_ff=4096)
    measured = serve_and_measure(berth, start_port, model, "--load-mode none")
    assert measured["host"] >= os.path.getsize(model), (measured, os.path.getsize(model))
