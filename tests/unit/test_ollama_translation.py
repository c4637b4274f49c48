"""Ollama's API translated to llama-server's OpenAI-compatible one and back, function by function."""

from __future__ import annotations

import base64
import json
import math
import time

import pytest

from berth.core.errors import BadRequest, UpstreamError
from berth.gateway.ledger import RequestRecord
from berth.gateway.ollama import requests as ollama
from berth.gateway.ollama.answers import Embeddings, Generation
from berth.gateway.ollama.models import human_number
from berth.gateway.ollama.names import RegistryOnlyName, hub_reference

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(32)).decode()
TIMINGS = {"cache_n": 3, "prompt_n": 11, "prompt_ms": 12.345678, "predicted_n": 7, "predicted_ms": 456.789012}


def record(waited: float = 0.25) -> RequestRecord:
    """A request taken `waited` seconds before it went to the model server (its load and queue time)."""
    began = time.perf_counter() - 1.0
    return RequestRecord("m", "/v1/chat/completions", began, time.time(), sent=began + waited)


def sse(*events: dict | str) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events)


def lines(data: bytes) -> list[dict]:
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


def fed(answer: Generation | Embeddings, data: bytes, piece: int) -> bytes:
    """`data` fed in pieces of `piece` bytes (an event split anywhere), then the end."""
    out = b"".join(answer.feed(data[i:i + piece]) for i in range(0, len(data), piece))
    return out + answer.close(record())


@pytest.mark.parametrize("value, seconds", [
    (None, None), (0, 0.0), (300, 300.0), (2.5, 2.5), (-1, math.inf), ("0", 0.0), ("5m", 300.0),
    ("1h30m", 5400.0), ("1.5s", 1.5), ("250ms", 0.25), ("-1", math.inf), ("-5m", math.inf), ("300", 300.0),
])
def test_keep_alive_as_ollama_reads_it(value, seconds):
    assert ollama.keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "", "1d", True, [5]])
def test_a_keep_alive_that_is_no_duration_is_refused_with_examples(value):
    with pytest.raises(BadRequest, match="keep_alive"):
        ollama.keep_alive_seconds(value)


def test_options_become_llama_servers_sampling_fields_and_load_options_are_not_sent():
    fields, num_ctx = ollama.sampling({"temperature": 0, "top_p": 0.9, "top_k": 20.0, "seed": 42,
                                       "num_predict": 64, "stop": "\n", "repeat_penalty": 1.1, "num_keep": 5,
                                       "num_ctx": 8192, "num_gpu": 99, "unknown_option": 1})
    assert fields == {"temperature": 0.0, "top_p": 0.9, "top_k": 20, "seed": 42, "n_predict": 64, "stop": ["\n"],
                      "repeat_penalty": 1.1, "n_keep": 5}
    assert num_ctx == 8192


@pytest.mark.parametrize("options, message", [
    ({"temperature": "hot"}, "options.temperature must be a number"),
    ({"top_k": 2.5}, "options.top_k must be a whole number"),
    ({"stop": [1]}, "options.stop must be a string or a list"),
    ({"seed": True}, "options.seed must be a number"),
    ("fast", "`options` must be an object"),
])
def test_wrong_options_are_named(options, message):
    with pytest.raises(BadRequest, match=message):
        ollama.sampling(options)


def test_chat_translates_messages_images_tools_format_and_think():
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    translated = ollama.chat({
        "model": "m", "stream": True, "tools": [tool], "format": schema, "think": False, "options": {"seed": 1},
        "messages": [
            {"role": "user", "content": "What is this?", "images": [PNG]},
            {"role": "assistant", "content": "", "thinking": "hmm",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
        ]})
    assert translated.path == "/v1/chat/completions" and translated.stream
    body = translated.body
    assert body["stream_options"] == {"include_usage": True}  # berth counts the usage of every answer
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    assert body["messages"][1] == {"role": "assistant", "content": "", "reasoning_content": "hmm", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert body["messages"][2] == {"role": "tool", "content": "sunny", "name": "get_weather"}
    assert body["tools"] == [tool]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["seed"] == 1


def test_the_python_clients_defaults_send_nothing_extra():
    """The `ollama` package sends `tools: []` and `stream: false` with every chat."""
    translated = ollama.chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [],
                              "stream": False})
    assert translated.body == {"model": "m", "stream": False, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("request_body, message", [
    ({"messages": "hi"}, "`messages` must be a list"),
    ({"messages": [{"content": "hi"}]}, r"messages\[0\] must be an object with a `role`"),
    ({"messages": [{"role": "user", "content": "x", "images": ["not base64!"]}]}, r"messages\[0\].images\[0\]"),
    ({"messages": [], "format": "yaml"}, "`format` must be \"json\" or a JSON schema"),
    ({"messages": [], "think": "hard"}, "`think` must be true, false or one of high"),
    ({"messages": [], "logprobs": True}, "`logprobs` is not supported"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"name": "f"}]}]}, r"tool_calls\[0\] must be"),
])
def test_wrong_chat_fields_are_named(request_body, message):
    with pytest.raises(BadRequest, match=message):
        ollama.chat({"model": "m", **request_body})


def test_a_missing_model_is_named():
    with pytest.raises(BadRequest, match="model is required"):
        ollama.chat({"messages": []})


def test_generate_is_a_chat_through_the_template_or_raw_text_completion():
    templated = ollama.generate({"model": "m", "prompt": "Why?", "system": "Be brief.", "format": "json",
                                 "think": "high"})
    assert templated.path == "/v1/chat/completions"
    assert templated.body["messages"] == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Why?"}]
    assert templated.body["response_format"] == {"type": "json_object"}
    assert templated.body["reasoning_effort"] == "high"
    raw = ollama.generate({"model": "m", "prompt": "[INST] hi [/INST]", "raw": True, "stream": False,
                           "format": {"type": "object"}})
    assert raw.path == "/v1/completions" and not raw.stream
    assert raw.body == {"model": "m", "stream": False, "prompt": "[INST] hi [/INST]", "json_schema": {"type": "object"}}
    with pytest.raises(BadRequest, match="raw mode .* does not take `system`"):
        ollama.generate({"model": "m", "prompt": "x", "raw": True, "system": "s"})
    for field in ("template", "context", "suffix"):
        with pytest.raises(BadRequest, match=f"`{field}` is not supported"):
            ollama.generate({"model": "m", "prompt": "x", field: [1] if field == "context" else "t"})


def test_embed_inputs_and_the_older_endpoints_raw_vectors():
    assert ollama.embed_inputs({"input": "a"}, legacy=False) == ["a"]
    assert ollama.embed_inputs({"input": ["a", "b"]}, legacy=False) == ["a", "b"]
    assert ollama.embed_inputs({"input": []}, legacy=False) == []
    assert ollama.embed({"model": "e"}, ["a"], legacy=True).body == {"model": "e", "input": ["a"], "embd_normalize": -1}
    with pytest.raises(BadRequest, match="`input` must be a string or a list of strings"):
        ollama.embed_inputs({"input": [1]}, legacy=False)
    with pytest.raises(BadRequest, match="`dimensions` must be a positive"):
        ollama.dimensions({"dimensions": 0})


@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_a_streamed_chat_becomes_ndjson_with_whole_tool_calls_and_llama_servers_timings(piece):
    stream = sse(
        {"choices": [{"index": 0, "delta": {"reasoning_content": "Let me see."}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Calling"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
            "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 14, "completion_tokens": 7}, "timings": TIMINGS},
        "[DONE]")
    objects = lines(fed(Generation("smol:latest", stream=True, chat=True), stream, piece))
    assert [o["done"] for o in objects] == [False, False, False, True]
    assert objects[0]["message"] == {"role": "assistant", "content": "", "thinking": "Let me see."}
    assert objects[1]["message"] == {"role": "assistant", "content": "Calling"}
    assert objects[2]["message"]["tool_calls"] == [
        {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]
    final = objects[3]
    assert final["model"] == "smol:latest" and final["done_reason"] == "stop"
    assert (final["prompt_eval_count"], final["eval_count"]) == (11, 7)  # what llama-server evaluated
    assert final["prompt_eval_duration"] == 12_345_678 and final["eval_duration"] == 456_789_012  # ns
    assert final["load_duration"] == 250_000_000
    assert final["total_duration"] >= 1_000_000_000
    assert final["created_at"].endswith("Z")


def test_a_whole_generate_answer_is_one_object_and_length_is_kept():
    body = json.dumps({"choices": [{"index": 0, "text": "blue", "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 4, "completion_tokens": 1}, "timings": TIMINGS}).encode()
    answer = Generation("m", stream=False, chat=False)
    assert answer.content_type == "application/json"
    result = json.loads(fed(answer, body, 5))
    assert (result["response"], result["done"], result["done_reason"]) == ("blue", True, "length")
    assert result["eval_duration"] == 456_789_012


def test_without_timings_the_counts_come_from_usage():
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 4, "completion_tokens": 2}}).encode()
    result = json.loads(fed(Generation("m", stream=False, chat=True), body, 100))
    assert (result["prompt_eval_count"], result["eval_count"]) == (4, 2) and "eval_duration" not in result


def test_errors_in_and_after_a_stream_become_error_lines_with_no_final_object():
    broken = Generation("m", stream=True, chat=True)
    out = broken.feed(sse({"choices": [{"delta": {"content": "a"}}]}, {"error": {"message": "context full"}}))
    first, error = lines(out)
    assert first["message"]["content"] == "a" and error == {"error": "context full"}
    assert broken.close(record()) == b""
    cut = Generation("m", stream=True, chat=False)
    assert lines(cut.failed(UpstreamError("model 'm' stopped answering"))) == [{"error": "model 'm' stopped answering"}]
    assert cut.close(record()) == b""
    bad_arguments = Generation("m", stream=False, chat=True)
    body = json.dumps({"choices": [{"message": {"tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}}]})
    assert "not a JSON object" in json.loads(fed(bad_arguments, body.encode(), 100))["error"]


def test_refused_answers_take_ollamas_shape_and_status():
    response = Generation("m", stream=True, chat=True).refused(400, "the prompt is longer than the context")
    assert response.status == 400 and json.loads(response.body) == {"error": "the prompt is longer than the context"}


def test_embeddings_in_index_order_cut_to_dimensions_and_normalized_again():
    body = json.dumps({"data": [{"index": 1, "embedding": [0.0, 3.0, 9.0]}, {"index": 0, "embedding": [3.0, 4.0, 1.0]}],
                       "usage": {"prompt_tokens": 5}}).encode()
    result = json.loads(fed(Embeddings("e", legacy=False, dimensions=2), body, 3))
    assert result["embeddings"] == [[0.6, 0.8], [0.0, 1.0]] and result["prompt_eval_count"] == 5
    assert result["model"] == "e" and result["load_duration"] == 250_000_000
    legacy = json.loads(fed(Embeddings("e", legacy=True, dimensions=None), body, 3))
    assert legacy == {"embedding": [3.0, 4.0, 1.0]}


@pytest.mark.parametrize("count, text", [(134_515_008, "134.52M"), (8_000_000_000, "8B"), (7_241_732_096, "7.2B"),
                                         (16_384, "16K"), (999, "999"), (3_000_000, "3M")])
def test_parameter_counts_as_ollama_writes_them(count, text):
    assert human_number(count) == text


@pytest.mark.parametrize("name, ref", [
    ("hf.co/bartowski/Qwen3-GGUF:Q4_K_M", "bartowski/Qwen3-GGUF:Q4_K_M"),
    ("huggingface.co/a/b", "a/b:Q4_K_M"), ("hf.co/a/b:latest", "a/b:Q4_K_M"), ("a/b:Q8_0", "a/b:Q8_0"),
    ("a/b:iq4_xs", "a/b:iq4_xs"),
])
def test_hugging_face_names_as_ollama_takes_them(name, ref):
    assert str(hub_reference(name)) == ref


@pytest.mark.parametrize("name", ["llama3.2", "llama3.2:1b", "library/qwen3:q4_0", "someone/model:latest",
                                  "registry.ollama.ai/library/llama3:8b"])
def test_names_of_ollamas_registry_are_refused_with_the_form_berth_pulls(name):
    with pytest.raises(RegistryOnlyName, match=r"hf.co/<owner>/<repo>:<QUANT>"):
        hub_reference(name)
