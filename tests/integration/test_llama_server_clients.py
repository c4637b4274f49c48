"""What a client written for one llama-server meets through berth (issue 29): the model server's error
bodies as it sent them, every llama-server route, a fixed model name, and `${PORT}` as a number."""

from __future__ import annotations

import json
import socket

import openai
import pytest
import requests

from tests.support.harness import fake_cmd

def post(url: str, path: str, body: object, **kwargs) -> requests.Response:
    return requests.post(url + path, json=body, timeout=30, **kwargs)


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_each_model_has_a_stable_port_it_takes_when_free(berth, start_port):
    b = berth(f"""
startPort: {start_port}
models:
  zeta: {{cmd: "{fake_cmd('zeta')}", metadata: {{port: "${{PORT}}", url: "http://127.0.0.1:${{PORT}}/"}}}}
  alpha: {{cmd: "{fake_cmd('alpha')}", metadata: {{port: "${{PORT}}"}}}}
  beta: {{cmd: "{fake_cmd('beta')}", metadata: {{port: "${{PORT}}"}}}}
""")

    def listed() -> dict[str, dict]:
        models = requests.get(b.url + "/v1/models", timeout=10).json()["data"]
        return {m["id"]: m["meta"]["llamaswap"] for m in models}

    # before anything runs: llama-swap's ports, startPort upwards in the order of the ids
    cold = listed()
    assert {m: meta["port"] for m, meta in cold.items()} == {"alpha": start_port, "beta": start_port + 1,
                                                            "zeta": start_port + 2}
    assert cold["zeta"]["url"] == f"http://127.0.0.1:{start_port + 2}/"
    blocker = socket.socket()  # something else holds beta's port
    blocker.bind(("127.0.0.1", start_port + 1))
    blocker.listen()
    try:
        for model in ("alpha", "beta", "zeta"):
            assert post(b.url, "/v1/chat/completions", chat_body(model)).status_code == 200
        ports = {m: b.running()[m]["port"] for m in ("alpha", "beta", "zeta")}
        # beta takes the first free port that is no model's own, so zeta still finds its own
        assert ports == {"alpha": start_port, "beta": start_port + 3, "zeta": start_port + 2}
        assert listed()["beta"]["port"] == start_port + 3  # what it has while it runs
    finally:
        blocker.close()
    assert requests.post(b.url + "/api/models/unload/beta", timeout=30).status_code == 200
    assert listed()["beta"]["port"] == start_port + 1
    assert post(b.url, "/v1/chat/completions", chat_body("beta")).status_code == 200
    assert b.running()["beta"]["port"] == start_port + 1
