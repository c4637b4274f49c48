"""The official `ollama` Python client against berth serving the real llama-server with the default model
(SmolLM2-135M-Instruct), and the final objects' counts and durations against what llama-server itself sent
for the same request."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import ollama
import pytest
import requests

from berth.engine.embedded import SMOLLM2_FILE, SMOLLM2_STORE_NAME
from tests.e2e.conftest import llama_server_binary
from tests.support.harness import free_port, pid_alive, wait_until
from tests.support.recording_relay import RecordingRelay

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 48}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}


def smollm2(home: str) -> Path:
    return Path(home) / "models" / SMOLLM2_STORE_NAME / "model.gguf"


def test_the_ollama_client_against_the_default_model(berth, smollm2_home):
    llama_server_binary()
    b = berth(None, env={"BERTH_HOME": smollm2_home})
    c = ollama.Client(host=b.url, timeout=300)
    assert requests.get(b.url + "/api/version", timeout=5).json()["version"]

    smol = {m.model: m for m in c.list().models}["smollm2-135m"]
    assert (smol.size, smol.digest) == (smollm2(smollm2_home).stat().st_size, SMOLLM2_FILE.sha256)
    assert (smol.details.format, smol.details.family, smol.details.parameter_size,
            smol.details.quantization_level) == ("gguf", "llama", "134.52M", "Q4_1")
    cold = c.show("smollm2-135m")  # from the GGUF and the cmd's flags: nothing starts
    assert b.running() == {}
    assert "<|im_start|>" in cold.template and cold.capabilities == ["completion"]  # its template has no tools
    assert "temperature          0.2" in cold.parameters and "num_ctx              2048" in cold.parameters
    assert cold.modelinfo["llama.context_length"] == 8192

    reply = c.chat(model="default", messages=QUESTION, options={"temperature": 0})  # greedy, to its own end
    assert "Paris" in reply.message.content and reply.done_reason == "stop"
    assert reply.eval_count > 0 and reply.eval_duration > 0 and reply.prompt_eval_count > 0
    parts = list(c.chat(model="default", messages=QUESTION, options={"temperature": 0}, stream=True))
    assert "Paris" in "".join(p.message.content for p in parts)
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done_reason == "stop"

    warm = c.show("smollm2-135m")  # what the running llama-server reports on /props
    assert warm.template == cold.template and "num_ctx              2048" in warm.parameters
    assert "repeat_penalty       1.1" in warm.parameters and "top_k                40" in warm.parameters

    city = json.loads(c.chat(model="default", messages=[{"role": "user", "content": "Name a city in France."}],
                             format=CITY, options={"temperature": 0, "num_predict": 64}).message.content)
    assert isinstance(city["city"], str)
    tools = c.chat(model="default", options={**GREEDY, "num_ctx": 8192}, tools=[WEATHER],
                   messages=[{"role": "user", "content": "What is the weather in Paris? Use the tool."}])
    for call in tools.message.tool_calls or []:  # this 135M model's template has no tools: it rarely calls one
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    assert tools.done and (tools.message.content or tools.message.tool_calls)
    assert "a client asks for num_ctx 8192; the model runs with 2048 tokens per slot" in b.output()

    generated = c.generate(model="default", prompt="Write one word: hello", options=GREEDY)
    assert generated.response and generated.done and generated.eval_count > 0
    streamed = list(c.generate(model="default", prompt="Write one word: hello", options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == generated.response  # greedy: the same answer

    [loaded] = c.ps().models
    assert loaded.model == "smollm2-135m" and loaded.size > 0 and loaded.context_length == 2048
    now = datetime.now(UTC)
    assert now < loaded.expires_at <= now + timedelta(seconds=900)
    pid = b.pid_of("smollm2-135m")
    last = c.generate(model="default", prompt="Hi", options={"num_predict": 4}, keep_alive=0)
    assert last.done  # answered, then unloaded
    wait_until(lambda: not pid_alive(pid), 30, "llama-server to stop after keep_alive 0")
    assert c.ps().models == []


@pytest.fixture
def relayed(berth, smollm2_home):
    """berth with SmolLM2 behind a relay that keeps llama-server's answers, and SmolLM2 as an embedder."""
    binary = llama_server_binary()
    port = free_port()
    relay = RecordingRelay(f"http://127.0.0.1:{port}").start()
    gguf = smollm2(smollm2_home)
    config = f"""
models:
  smol:
    proxy: {relay.url}
    cmd: {binary} -m {gguf} --host 127.0.0.1 --port {port} -c 2048 --parallel 1 --jinja -t 2
  embed:
    cmd: {binary} -m {gguf} --host 127.0.0.1 --port ${{PORT}} -c 512 --embeddings --pooling mean -t 2
"""
    try:
        yield berth(config, env={"BERTH_HOME": smollm2_home}), relay
    finally:
        relay.stop()


def assert_timings_equal(final, timings: dict) -> None:
    """Ollama's counts and nanoseconds are llama-server's own figures for the request."""
    assert final.prompt_eval_count == timings["prompt_n"]
    assert final.prompt_eval_duration == round(timings["prompt_ms"] * 1_000_000)
    assert final.eval_count == timings["predicted_n"]
    assert final.eval_duration == round(timings["predicted_ms"] * 1_000_000)
    assert final.total_duration >= final.load_duration + final.eval_duration


def test_counts_and_durations_are_llama_servers_timings_for_that_request(relayed):
    b, relay = relayed
    c = ollama.Client(host=b.url, timeout=300)
    options = {"temperature": 0, "num_predict": 24}
    for stream in (False, True):
        answer = c.chat(model="smol", messages=QUESTION, options=options, stream=stream)
        final = list(answer)[-1] if stream else answer
        exchange = relay.answers_to("/v1/chat/completions")[-1]
        assert exchange.request["stream"] is stream
        assert_timings_equal(final, exchange.timings())
        usage = [e["usage"] for e in exchange.events() if "usage" in e][-1]
        assert final.eval_count == usage["completion_tokens"]
        for raw, path in ((False, "/v1/chat/completions"), (True, "/v1/completions")):
            answer = c.generate(model="smol", prompt="The sky is", raw=raw, options=options, stream=stream)
            parts = list(answer) if stream else [answer]
            exchange = relay.answers_to(path)[-1]
            assert_timings_equal(parts[-1], exchange.timings())
            sent = "".join((choice.get("delta") or {}).get("content") or choice.get("text") or
                           (choice.get("message") or {}).get("content") or ""
                           for event in exchange.events() for choice in event.get("choices") or [])
            assert "".join(p.response for p in parts) == sent  # the text is llama-server's, unchanged


def test_embed_through_the_ollama_client(relayed):
    b, _ = relayed
    c = ollama.Client(host=b.url, timeout=300)
    embedded = c.embed(model="embed", input=["The sky is blue.", "Paris is in France."])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 576
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-4) for v in embedded.embeddings)
    direct = requests.post(b.url + "/v1/embeddings", json={"model": "embed", "input": ["The sky is blue.",
                                                                                      "Paris is in France."]},
                           timeout=120).json()
    assert embedded.prompt_eval_count == direct["usage"]["prompt_tokens"]
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(embedded.embeddings[1], direct["data"][1]["embedding"]))
    raw = c.embeddings(model="embed", prompt="The sky is blue.").embedding  # the older endpoint: not normalized
    norm = math.sqrt(math.fsum(x * x for x in raw))
    assert norm > 1.5 and all(math.isclose(x / norm, y, abs_tol=1e-4) for x, y in zip(raw, embedded.embeddings[0]))
    cut = c.embed(model="embed", input="The sky is blue.", dimensions=64).embeddings[0]
    assert len(cut) == 64 and math.isclose(math.fsum(x * x for x in cut), 1.0, rel_tol=1e-4)
