"""What a client written for one llama-server meets through berth (issue 29): the model server's error
bodies as it sent them, every llama-server route, a fixed model name, and `${PORT}` as a number."""

from __future__ import annotations

import json
import socket

import openai
import pytest
import requests

from tests.support.harness import fake_cmd

# llama-server's answer to a prompt over the context, fields a client trims a conversation by included
CONTEXT_ERROR = {"error": {"code": 400, "message": "request (1208 tokens) exceeds the available context size "
                           "(256 tokens), try increasing it", "type": "exceed_context_size_error",
                           "n_prompt_tokens": 1208, "n_ctx": 256}}


def post(url: str, path: str, body: object, **kwargs) -> requests.Response:
    return requests.post(url + path, json=body, timeout=30, **kwargs)


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_error_bodies_in_openai_shape_pass_unchanged_and_others_are_wrapped(berth, start_port):
    b = berth(f"""
startPort: {start_port}
models:
  a: {{cmd: "{fake_cmd('a')}"}}
  loading: {{cmd: "{fake_cmd('loading', '--load-delay', '1')}", sendLoadingState: true}}
""")
    sent = {"status": 400, "body": CONTEXT_ERROR, "headers": {"Retry-After": "7", "X-Request-Id": "req-1"}}
    for stream in (False, True):  # llama-server refuses a streamed request the same way, before any event
        r = post(b.url, "/v1/chat/completions", chat_body("a", stream=stream, upstream_error=sent))
        assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/json")
        assert r.content == json.dumps(CONTEXT_ERROR).encode()  # byte for byte as the model server sent it
        assert r.headers["Retry-After"] == "7" and r.headers["X-Request-Id"] == "req-1"
    client = openai.OpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"upstream_error": sent})
    assert raised.value.body["n_ctx"] == 256 and raised.value.body["n_prompt_tokens"] == 1208

    # a streamed chat that waited for its model's start (sendLoadingState) gets the same body as its event
    with requests.post(b.url + "/v1/chat/completions", json=chat_body("loading", stream=True, upstream_error=sent),
                       stream=True, timeout=30) as r:
        events = [line[len(b"data: "):] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert json.loads(events[-2]) == CONTEXT_ERROR and events[-1] == b"[DONE]"

    # not JSON, or JSON in another shape: wrapped in OpenAI's, the original text kept, the status and
    # headers the model server sent
    text = {"status": 503, "body": "upstream exploded\nat line 3", "headers": {"Retry-After": "3"}}
    r = post(b.url, "/v1/chat/completions", chat_body("a", upstream_error=text))
    assert r.status_code == 503 and r.headers["Retry-After"] == "3" and r.json() == {"error": {
        "message": "upstream exploded\nat line 3", "type": "server_error", "code": "upstream_http_503",
        "upstream": "upstream exploded\nat line 3"}}
    untyped = {"error": {"message": "slot 3 is busy", "code": 5}}
    r = post(b.url, "/v1/chat/completions", chat_body("a", upstream_error={"status": 409, "body": untyped}))
    assert r.status_code == 409 and r.json()["error"] == {
        "message": "slot 3 is busy", "type": "invalid_request_error", "code": "upstream_http_409",
        "upstream": untyped}


# POST routes of llama-server 11434 that berth did not route before; each names its model in the body
BODY_ROUTES = ("/chat/completions/input_tokens", "/v1/chat/completions/input_tokens", "/responses/input_tokens",
               "/v1/responses/input_tokens", "/responses", "/v1/chat/completions/control", "/v1/systemone", "/props")
# routes whose request names no model: ?model=, else the default model
UNNAMED_ROUTES = (("GET", "/props", None),  # beside POST /props, which names its model in the body
                  ("POST", "/lora-adapters", [{"id": 0, "scale": 0.5}]), ("GET", "/v1/stream?conv_id=c1", None),
                  ("DELETE", "/v1/stream?conv_id=c1", None), ("POST", "/v1/streams/lookup",
                                                              {"conversation_ids": ["c1"]}))


def test_every_llama_server_route_reaches_the_model(berth, start_port):
    b = berth(f"""
startPort: {start_port}
apiKeys: [k, {{name: user, key: u, scopes: [inference]}}]
models:
  a: {{cmd: "{fake_cmd('a')}", aliases: [default]}}
  b: {{cmd: "{fake_cmd('b')}"}}
""")
    key = {"Authorization": "Bearer k"}
    for path in BODY_ROUTES:
        r = post(b.url, path, {"model": "b", "messages": []}, headers=key)
        assert r.status_code == 200, (path, r.text)
        echoed = r.json()  # the fake echoes what reached it
        assert (echoed["server"], echoed["path"]) == ("b", path) and json.loads(echoed["body"])["model"] == "b"
    for method, path, body in UNNAMED_ROUTES:
        for query, server in (("", "a"), ("model=b", "b")):  # `default` without ?model=
            url = b.url + path + ("&" if "?" in path else "?") * bool(query) + query
            r = requests.request(method, url, json=body, headers=key, timeout=30)
            assert r.status_code == 200 and r.json()["server"] == server, (method, url, r.text)
            assert r.json()["path"] == path.partition("?")[0]
    r = requests.post(b.url + "/audio/transcriptions", files={"file": ("a.wav", b"RIFF")}, data={"model": "b"},
                      headers=key, timeout=30)
    assert r.status_code == 200 and (r.json()["server"], r.json()["path"]) == ("b", "/audio/transcriptions")
    r = requests.post(b.url + "/slots/0?action=save", json={"filename": "x.bin"}, headers=key, timeout=30)
    assert r.status_code == 500 and "failed to open slot file" in r.json()["error"]["message"]  # the fake's slot
    # POST /props changes the model server for everyone: a key with `admin` (k has every scope), not `inference`
    user = {"Authorization": "Bearer u"}
    assert post(b.url, "/v1/chat/completions", chat_body("b"), headers=user).status_code == 200
    r = post(b.url, "/props", {"model": "b"}, headers=user)
    assert r.status_code == 403 and r.json()["error"]["code"] == "scope_not_allowed"
    # llama-server's second health route, like the first without a key
    assert requests.get(b.url + "/v1/health", timeout=10).status_code == 200
    assert requests.get(b.url + "/v1/models", timeout=10).status_code == 401


def test_fallback_model_serves_unknown_names_and_says_so(berth, start_port, tmp_path):
    config = f"""
startPort: {start_port}
models:
  a: {{cmd: "{fake_cmd('a')}"}}
  b: {{cmd: "{fake_cmd('b')}"}}
"""
    plain = berth(config)
    r = post(plain.url, "/v1/chat/completions", chat_body("gpt-3.5-turbo-instruct"))
    assert r.status_code == 404 and r.json()["error"]["message"] == (
        "model 'gpt-3.5-turbo-instruct' is not configured; available models: a, b")
    plain.stop()

    b = berth("fallbackModel: b\n" + config)
    client = openai.OpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(model="gpt-3.5-turbo-instruct",
                                            messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "b"  # the fake answers with the model it was sent: berth renamed it
    chunks = list(client.chat.completions.create(model="davinci-002", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert {chunk.model for chunk in chunks if chunk.choices} == {"b"}  # (the fake's usage chunk names none)
    assert post(b.url, "/v1/chat/completions", chat_body("a")).json()["server"] == "a"  # known names as before
    r = requests.post(b.url + "/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")},
                      data={"model": "whisper-1"}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "b"
    logs = requests.get(b.url + "/logs", timeout=10).text
    assert "no model is named 'gpt-3.5-turbo-instruct': b serves the request (fallbackModel)" in logs
    assert "no model is named 'whisper-1': b serves the request (fallbackModel)" in logs


def test_each_model_has_a_stable_port_it_takes_when_free(berth, start_port):
    # sizes declared: a model of unknown size runs alone until berth has measured it, and that measurement
    # races the next request here (the three must run together for their ports to be compared)
    b = berth(f"""
startPort: {start_port}
models:
  zeta: {{cmd: "{fake_cmd('zeta')}", memory: {{ram: 64MiB}}, metadata: {{port: "${{PORT}}", url: "http://127.0.0.1:${{PORT}}/"}}}}
  alpha: {{cmd: "{fake_cmd('alpha')}", memory: {{ram: 64MiB}}, metadata: {{port: "${{PORT}}"}}}}
  beta: {{cmd: "{fake_cmd('beta')}", memory: {{ram: 64MiB}}, metadata: {{port: "${{PORT}}"}}}}
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
