"""A model server answers berth and nobody else on the machine (issue 22, item 6): each llama.cpp run gets a
fresh key through its environment, berth presents it on every request of its own (the proxied ones, health
checks, warmup, KV slot saves and restores, the KV gauge), and a direct call to the server's port without it
is refused. A key the cmd names itself keeps working. Real llama-server and the built-in worker, the real
Gemma 3 270M."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families


ASK = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}


def _environment(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_model_server_answers_berth_and_nobody_else(berth, start_port, model_cmd):
    b = berth(f"""
startPort: {start_port}
models:
  m:
    cmd: {model_cmd("-c 1024 -np 1")}
    warmup: true
    kvPersistence: true  # Gemma's sliding window: saved slots only with --swa-full, which berth then adds
  own:
    cmd: {model_cmd("-c 1024 -np 1 --api-key users-own-key")}
""")
    answered = requests.post(b.url + "/v1/chat/completions", json={"model": "m", **ASK}, timeout=120)
    assert answered.status_code == 200, answered.text  # it became ready: health checks and warmup got in
    entry = b.running()["m"]
    direct = f"http://127.0.0.1:{entry['port']}"
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/slots"), ("GET", "/props")):
        refused = requests.request(method, direct + path, json={"model": "m", **ASK}, timeout=60)
        assert refused.status_code == 401, (path, refused.text)

    key = _environment(entry["pid"])["LLAMA_API_KEY"]
    assert requests.get(direct + "/props", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    assert requests.get(b.url + "/upstream/m/props", timeout=30).status_code == 200  # its own routes, through berth
    # the KV gauge: berth read the server's /slots with the key
    assert _samples(b.url).get(("berth_model_kv_cache_usage_ratio", (("model", "m"),))) is not None
    shown = [Path(f"/proc/{entry['pid']}/cmdline").read_bytes().decode(errors="replace"),
             json.dumps(requests.get(b.url + "/running", timeout=10).json()),
             requests.get(b.url + "/logs", timeout=10).text]
    assert not [text for text in shown if key in text]

    # KV slots are saved at the unload and restored at the next start, through the slot API, with the key
    assert requests.post(b.url + "/unload", timeout=60).status_code == 200
    assert requests.post(b.url + "/v1/chat/completions", json={"model": "m", **ASK}, timeout=120).status_code == 200
    counted = _samples(b.url)
    assert counted.get(("berth_kv_slot_saves_total", (("model", "m"), ("outcome", "ok")))), counted
    assert counted.get(("berth_kv_slot_restores_total", (("model", "m"), ("outcome", "ok")))), counted
    assert counted.get(("berth_kv_slot_saves_total", (("model", "m"), ("outcome", "failed")))) is None
    fresh = _environment(b.running()["m"]["pid"])["LLAMA_API_KEY"]
    assert fresh != key  # a run's key dies with it

    # the cmd's own --api-key: berth presents it, and a client holding it may still call the port
    assert requests.post(b.url + "/v1/chat/completions", json={"model": "own", **ASK}, timeout=120).status_code == 200
    own = b.running()["own"]
    assert "LLAMA_API_KEY" not in _environment(own["pid"])
    own_direct = f"http://127.0.0.1:{own['port']}/props"
    assert requests.get(own_direct, timeout=30).status_code == 401
    assert requests.get(own_direct, headers={"Authorization": "Bearer users-own-key"}, timeout=30).status_code == 200
    assert "users-own-key" not in json.dumps(requests.get(b.url + "/running", timeout=10).json())
    assert key not in b.output() and fresh not in b.output()  # berth's own log
