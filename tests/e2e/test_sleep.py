"""sleepAfter on the real llama-server: the model sleeps (process kept, model out of memory), berth
shows it, lends its memory to another model, and the next request wakes the same process."""

from __future__ import annotations

import subprocess
import sys

import psutil
import requests

from tests.e2e.conftest import llama_server_binary
from tests.support.harness import BerthServer, server_key_headers, wait_until

MiB = 1024**2


def ask(b: BerthServer, model: str) -> dict:
    r = requests.post(b.url + "/v1/chat/completions", timeout=300,
                      json={"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_sleeping_model_frees_memory_another_model_uses_and_wakes_on_the_next_request(berth, tmp_path,
                                                                                         gemma_gguf):
    binary = llama_server_binary()
    common = f"{binary} -m {gemma_gguf} --port ${{PORT}} --no-jinja --chat-template gemma -t 2 -c 512 -np 1"
    # both declared at 400 MiB in a 700 MiB budget: they run side by side only while `nap` sleeps
    b = berth(f"""
memory: {{budget: {{ram: 700MiB}}, headroom: 0}}
models:
  nap:
    cmd: {common}
    memory: {{ram: 400MiB}}
    sleepAfter: 1
    ttl: 600
  other:
    cmd: {common}
    memory: {{ram: 400MiB}}
""", env={"BERTH_HOME": str(tmp_path / "home")})
    ask(b, "nap")
    nap_pid = b.pid_of("nap")
    assert "--sleep-idle-seconds 1" in b.running()["nap"]["cmd"]

    wait_until(lambda: b.running()["nap"]["state"] == "sleeping", 60, "nap to sleep")
    nap = b.running()["nap"]
    assert nap["pid"] == nap_pid and psutil.pid_exists(nap_pid)  # the process stays
    kept = nap["memory"]["measured_bytes"]["host"]
    assert kept < 300 * MiB, f"a sleeping llama-server still holds {kept / MiB:.0f} MiB"
    props = requests.get(f"{nap['proxy']}/props", headers=server_key_headers(nap_pid), timeout=5).json()
    assert props["is_sleeping"] is True
    models = {m["id"]: m for m in requests.get(b.url + "/v1/models", timeout=5).json()["data"]}
    assert models["nap"]["state"] == "sleeping"
    ps = subprocess.run([sys.executable, "-m", "berth.cli", "ps", "--url", b.url], capture_output=True, text=True,
                        timeout=60)
    assert ps.returncode == 0, ps.stderr
    assert any(line.split()[:2] == ["nap", "sleeping"] for line in ps.stdout.splitlines()), ps.stdout

    ask(b, "other")  # fits only because nap's memory is free while it sleeps: nap is not stopped
    running = b.running()
    assert running["other"]["state"] == "ready"
    assert running["nap"]["state"] == "sleeping" and running["nap"]["pid"] == nap_pid

    answer = ask(b, "nap")  # wakes the same process; `other` (idle) is evicted to make room
    assert answer["choices"][0]["message"]["content"]
    running = b.running()
    assert running["nap"]["state"] == "ready" and running["nap"]["pid"] == nap_pid
    assert "other" not in running or running["other"]["state"] in ("stopping", "stopped")
    assert "waking nap" in b.output() and "stopping other (memory)" in b.output()
