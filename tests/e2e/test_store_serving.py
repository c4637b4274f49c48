"""A config whose model lives on a hub: pulled before the first start, then served; offline fails at once."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.support.fake_hub import FakeHub

REPO = "google/gemma-3-270m-GGUF"


def test_config_model_is_pulled_then_served(berth, tmp_path, gemma_gguf, engine, start_port):
    hub = FakeHub().start()
    try:
        hub.add(REPO, "gemma-3-270m-Q4_K_M.gguf", Path(gemma_gguf))
        config = f"""
startPort: {start_port}
models:
  gemma:
    model: {REPO}:Q4_K_M
    cmd: {engine} --port ${{PORT}} -c 1024 --no-jinja --chat-template gemma
  gemma-hf:
    cmd: {engine} -hf {REPO}:Q4_K_M --port ${{PORT}} -c 1024 --no-jinja --chat-template gemma
"""
        env = {"BERTH_HOME": str(tmp_path / "home"), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        b = berth(config, env=env)
        try:
            body = {"model": "gemma", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
            r = requests.post(b.url + "/v1/chat/completions", json=body, timeout=300)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip()
            assert hub.gets["gemma-3-270m-Q4_K_M.gguf"] == 1
            stored = tmp_path / "home" / "models" / "gemma-3-270m-q4_k_m" / "model.gguf"
            assert f"--model {stored}" in b.running()["gemma"]["cmd"]
            r = requests.post(b.url + "/v1/chat/completions", json={**body, "model": "gemma-hf"}, timeout=300)
            assert r.status_code == 200
            assert hub.gets["gemma-3-270m-Q4_K_M.gguf"] == 1  # same store entry: not downloaded again
            assert f"-hf {REPO}" not in b.running()["gemma-hf"]["cmd"]
        finally:
            b.stop()
    finally:
        hub.stop()


def test_offline_model_missing_from_store_fails_at_once(berth, tmp_path, engine, start_port):
    config = f"""
startPort: {start_port}
models:
  gemma:
    model: {REPO}:Q4_K_M
    cmd: {engine} --port ${{PORT}}
"""
    env = {"BERTH_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    b = berth(config, env=env)
    try:
        r = requests.post(b.url + "/v1/chat/completions", json={"model": "gemma", "messages": []}, timeout=60)
        assert r.status_code == 503  # before any process was spawned: the store said no
        assert f"run `berth pull {REPO}:Q4_K_M`" in r.json()["error"]["message"]
    finally:
        b.stop()
