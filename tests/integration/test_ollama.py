"""Ollama's API, through the official `ollama` Python client, against berth with fake model servers and the
stand-in hub: translation both ways, errors in Ollama's shape, keep_alive, pull and delete."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import ollama
import pytest
import requests

from tests.support.fake_hub import FakeHub
from tests.support.ggufs import write_gguf
from tests.support.harness import fake_cmd, pid_alive, wait_until

REPO = "acme/tiny-llm-GGUF"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
HI = [{"role": "user", "content": "say hello to me"}]


def fake_models(start_port: int, extra: str = "") -> str:
    return f"""
startPort: {start_port}
healthCheckTimeout: 20
{extra}
models:
  m:
    ttl: 600
    aliases: [default]
    cmd: {fake_cmd('m')}
"""


def client(b, key: str | None = None) -> ollama.Client:
    return ollama.Client(host=b.url, timeout=60, headers={"Authorization": f"Bearer {key}"} if key else None)


@pytest.fixture
def hub():
    server = FakeHub().start()
    yield server
    server.stop()


def test_chat_and_generate_are_answered_in_ollamas_shapes(berth, start_port):
    b = berth(fake_models(start_port))
    c = client(b)
    whole = c.chat(model="m", messages=HI)
    assert (whole.message.role, whole.message.content) == ("assistant", "hello from m")
    assert whole.done and whole.done_reason == "stop" and whole.model == "m"
    # the fake server sends no timings: the counts are its usage (one token per word of the prompt)
    assert (whole.prompt_eval_count, whole.eval_count) == (4, 3)
    assert whole.total_duration >= whole.load_duration > 0
    parts = list(c.chat(model="default:latest", messages=HI, stream=True))  # `:latest` as Ollama's clients add
    assert "".join(p.message.content for p in parts) == "tok0 tok1 tok2 tok3 tok4 "
    assert [p.done for p in parts] == [False] * 5 + [True]
    assert parts[-1].eval_count == 5 and parts[-1].model == "default:latest"
    structured = c.chat(model="m", messages=HI, format={"type": "object"})
    assert structured.message.content == '{"answer": "hello from m"}'  # response_format reached the server
    generated = c.generate(model="m", prompt="say hello", system="be kind")
    assert generated.response == "hello from m" and generated.prompt_eval_count == 4  # system + prompt, as messages
    streamed = list(c.generate(model="m", prompt="hello", stream=True))
    assert "".join(p.response for p in streamed) == "tok0 tok1 tok2 tok3 tok4 " and streamed[-1].done
    recent = requests.get(b.url + "/api/requests", timeout=5).json()["requests"]
    assert len(recent) == 5 and {r["model"] for r in recent} == {"m"}  # counted like every request
    assert recent[0]["prompt_tokens"] == 1 and recent[0]["completion_tokens"] == 5


def test_tool_calls_come_back_whole_with_arguments_as_objects(berth, start_port):
    b = berth(fake_models(start_port))
    c = client(b)
    whole = c.chat(model="m", messages=HI, tools=[WEATHER])
    [call] = whole.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", {"city": "Paris"})
    assert whole.done_reason == "stop"
    parts = list(c.chat(model="m", messages=HI, tools=[WEATHER], stream=True))
    calls = [call for p in parts for call in (p.message.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert parts[-1].done and parts[-1].eval_count == 3
    follow_up = c.chat(model="m", messages=[*HI, whole.message, {"role": "tool", "content": "sunny",
                                                                  "tool_name": "get_weather"}])
    assert follow_up.message.content == "hello from m"  # the client's own tool turn is accepted


def test_errors_answer_in_ollamas_shape_with_their_status(berth, start_port):
    b = berth(fake_models(start_port, 'apiKeys: ["sekrit"]'))
    with pytest.raises(ollama.ResponseError) as refused:
        client(b).list()
    assert refused.value.status_code == 401 and "API key" in refused.value.error
    c = client(b, "sekrit")  # Ollama's clients send the key as a bearer token
    assert [m.model for m in c.list().models] == ["m"]
    with pytest.raises(ollama.ResponseError) as unknown:
        c.chat(model="nope", messages=HI)
    assert unknown.value.status_code == 404 and "'nope' is not configured" in unknown.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        c.chat(model="m", messages=HI, keep_alive="for a while")
    assert bad.value.status_code == 400 and "keep_alive" in bad.value.error
    headers = {"Authorization": "Bearer sekrit", "Content-Type": "application/json"}
    for body, status, words in ((b"", 400, "missing request body"), (b"{", 400, "not valid JSON"),
                                (b'{"model": "m", "messages": [], "options": {"top_k": "many"}}', 400, "top_k"),
                                (b'{"messages": []}', 400, "model is required")):
        r = requests.post(b.url + "/api/chat", data=body, headers=headers, timeout=10)
        assert r.status_code == status and words in r.json()["error"], r.text
    openai_route = requests.get(b.url + "/v1/models", timeout=5)  # other routes keep OpenAI's shape
    assert openai_route.json()["error"]["code"] == "invalid_api_key"


def test_fallback_model_answers_names_berth_does_not_know_but_pull_and_delete_keep_theirs(berth, start_port):
    """Ollama's clients name models of Ollama's registry (`llama3.2`); with fallbackModel set they reach it, as
    /v1 requests do, and the answers name the model that answered. Pull and delete act on the store's model
    of that name, never on the fallback."""
    b = berth(f"""
startPort: {start_port}
fallbackModel: b
models:
  a: {{cmd: "{fake_cmd('a')}"}}
  b: {{cmd: "{fake_cmd('b')}", ttl: 600}}
""")
    c = client(b)
    whole = c.chat(model="llama3.2", messages=HI)
    assert (whole.message.content, whole.model) == ("hello from b", "b")
    parts = list(c.generate(model="qwen3:8b", prompt="hi", stream=True))
    assert {p.model for p in parts} == {"b"} and parts[-1].done
    assert c.chat(model="a", messages=HI).message.content == "hello from a"  # known names as before
    assert c.show("llama3.2") is not None  # `ollama run` shows a model before it chats with it
    with pytest.raises(ollama.ResponseError) as registry:
        c.pull("llama3.2")
    assert registry.value.status_code == 400 and "Ollama's registry" in registry.value.error
    pid = b.pid_of("b")
    with pytest.raises(ollama.ResponseError) as refused:
        c.delete("llama3.2")
    assert refused.value.status_code == 400 and "Ollama's registry" in refused.value.error
    assert b.pid_of("b") == pid and pid_alive(pid)  # nothing of the fallback was touched
    unloaded = c.generate(model="llama3.2", keep_alive=0)  # `ollama stop llama3.2`: the model that answered it
    assert (unloaded.done_reason, unloaded.model) == ("unload", "b") and not pid_alive(pid)
    loaded = c.embed(model="nomic-embed-text", input=[])
    assert loaded.model == "b" and loaded.embeddings == [] and b.pid_of("b")
    logs = requests.get(b.url + "/logs", timeout=10).text
    assert "no model is named 'llama3.2': b serves the request (fallbackModel)" in logs


def test_keep_alive_sets_the_idle_ttl_and_zero_unloads_after_the_answer(berth, start_port):
    b = berth(fake_models(start_port))
    c = client(b)
    loaded = c.generate(model="m")  # no prompt: the model is loaded and nothing generated
    assert loaded.done_reason == "load" and b.pid_of("m")
    assert 590 < b.running()["m"]["ttl_remaining_s"] <= 600  # the config's TTL
    c.chat(model="m", messages=HI, keep_alive="1h")
    assert 3590 < b.running()["m"]["ttl_remaining_s"] <= 3600
    [running] = c.ps().models
    left = (running.expires_at - datetime.now(UTC)).total_seconds()
    assert running.model == "m" and 3500 < left <= 3600
    c.chat(model="m", messages=HI, keep_alive=-1)
    assert b.running()["m"]["ttl_remaining_s"] is None and c.ps().models[0].expires_at.year > 2300
    pid = b.pid_of("m")
    answer = c.chat(model="m", messages=HI, keep_alive=0)
    assert answer.message.content == "hello from m"  # answered first, then unloaded
    wait_until(lambda: not pid_alive(pid), 10, "the model to stop after its answer")
    assert c.ps().models == [] and b.running() == {}
    c.chat(model="m", messages=HI)
    assert 590 < b.running()["m"]["ttl_remaining_s"] <= 600  # keep_alive held for that run only
    pid = b.pid_of("m")
    unloaded = c.generate(model="m", keep_alive=0)  # Ollama's way to unload (`ollama stop`)
    assert unloaded.done_reason == "unload" and not pid_alive(pid) and b.running() == {}


def publish(hub: FakeHub, tmp_path: Path, name: str = "tiny-Q4_K_M.gguf", elements: int = 1 << 16) -> str:
    return hub.add(REPO, name, write_gguf(tmp_path / "upstream" / name, elements=elements)).sha256


def test_pull_streams_progress_into_the_store_and_delete_removes_it(berth, hub, tmp_path, start_port):
    sha = publish(hub, tmp_path)
    home = tmp_path / "home"
    config = f"""
startPort: {start_port}
models:
  tiny:
    model: {REPO}:Q4_K_M
    cmd: llama-server --port ${{PORT}}
"""
    b = berth(config, env={"BERTH_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf")})
    c = client(b)
    [listed] = c.list().models
    assert (listed.model, listed.size, listed.digest) == ("tiny", 0, "")  # not pulled yet
    progress = list(c.pull(f"hf.co/{REPO}:Q4_K_M", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    files = [p for p in progress if p.digest]
    assert {p.digest for p in files} == {f"sha256:{sha}"} and files[0].status == f"pulling {sha[:12]}"
    assert files[-1].completed == files[-1].total == hub.repos[REPO]["tiny-Q4_K_M.gguf"].size
    assert "verifying sha256 digest" in [p.status for p in progress]
    entry = home / "models" / "tiny-llm-q4_k_m"
    assert (entry / "berth-model.json").exists()
    [listed] = c.list().models  # now from the store: its size, the hash it was verified against, its header
    assert (listed.size, listed.digest) == (hub.repos[REPO]["tiny-Q4_K_M.gguf"].size, sha)
    assert (listed.details.family, listed.details.parameter_size) == ("llama", "262K")
    shown = c.show("tiny")
    assert shown.modelinfo["general.architecture"] == "llama" and b.running() == {}  # show starts nothing
    assert c.pull("tiny").status == "success" and hub.gets["tiny-Q4_K_M.gguf"] == 1  # there already
    assert c.delete("tiny").status == "success"
    assert not entry.exists()
    with pytest.raises(ollama.ResponseError) as gone:
        c.delete(f"hf.co/{REPO}:Q4_K_M")
    assert gone.value.status_code == 404 and "not found" in gone.value.error


def test_pulling_a_model_no_config_model_names_keeps_it_in_the_store_and_says_so(berth, hub, tmp_path, start_port):
    publish(hub, tmp_path, "other-Q8_0.gguf")
    home = tmp_path / "home"
    b = berth(fake_models(start_port), env={"BERTH_HOME": str(home), "HF_ENDPOINT": hub.url,
                                            "HF_HOME": str(home / "hf")})
    c = client(b)
    statuses = [p.status for p in c.pull(f"{REPO}:Q8_0", stream=True)]
    assert any("berth serves it once a model of the config names it" in s for s in statuses if s)
    assert (home / "models" / "tiny-llm-q8_0" / "berth-model.json").exists()
    assert [m.model for m in c.list().models] == ["m"]  # berth serves its config's models
    statuses = [p.status for p in c.pull("m", stream=True)]  # a config model that runs a file of its own
    assert statuses[-1] == "success" and "nothing to pull" in statuses[0]
    with pytest.raises(ollama.ResponseError) as registry:
        c.pull("llama3.2")
    assert registry.value.status_code == 400 and "Ollama's registry" in registry.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        c.pull(f"hf.co/{REPO}:Q2_K")
    assert missing.value.error.startswith(f"{REPO} has no GGUF file for quant 'Q2_K'")
    c.delete(f"{REPO}:Q8_0")
    assert not (home / "models" / "tiny-llm-q8_0").exists()


def test_a_client_that_leaves_a_pull_stops_it_and_the_partial_file_stays(berth, hub, tmp_path, start_port):
    publish(hub, tmp_path, elements=1 << 19)  # 2 MiB in 64 KiB blocks
    hub.seconds_per_block = 0.2
    home = tmp_path / "home"
    b = berth(fake_models(start_port), env={"BERTH_HOME": str(home), "HF_ENDPOINT": hub.url,
                                            "HF_HOME": str(home / "hf")})
    with requests.post(b.url + "/api/pull", json={"model": f"hf.co/{REPO}"}, stream=True, timeout=30) as r:
        for line in r.iter_lines():
            if b'"completed":' in line and hub.bytes_sent["tiny-Q4_K_M.gguf"] > 128 * 1024:
                break
    sent = hub.bytes_sent["tiny-Q4_K_M.gguf"]
    time.sleep(1.5)  # a pull still under way would have fetched several more blocks by now
    assert hub.bytes_sent["tiny-Q4_K_M.gguf"] - sent <= 2 * 64 * 1024
    partial = home / "models" / "tiny-llm-q4_k_m" / "files" / "tiny-Q4_K_M.gguf.partial"
    assert partial.exists() and 0 < partial.stat().st_size < hub.repos[REPO]["tiny-Q4_K_M.gguf"].size
