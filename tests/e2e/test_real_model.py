"""Through berth, on the real model, on both engines (llama-server binary and built-in worker)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
import requests

from tests.support.harness import BerthServer, children_of, pid_alive, wait_until

MESSAGES = [{"role": "user", "content": "Name three colors."}]


def one_model(start_port: int, cmd: str, extra: str = "") -> str:
    return f"""
startPort: {start_port}
healthCheckTimeout: 60
models:
  gemma:
{extra}
    cmd: {cmd}
"""


def client(b: BerthServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=b.url + "/v1", api_key="none", max_retries=0)


def test_chat_and_completions(berth, start_port, model_cmd):
    b = berth(one_model(start_port, model_cmd("-c 2048")))
    reply = client(b).chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=16)
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    text = client(b).completions.create(model="gemma", prompt="The sky is", max_tokens=8)
    assert text.choices[0].text.strip()
    tokens = requests.get(b.url + "/metrics").text
    assert 'berth_tokens_total{kind="completion",model="gemma"}' in tokens


def test_streaming_with_openai_client_sync_and_async(berth, start_port, model_cmd):
    b = berth(one_model(start_port, model_cmd("-c 2048 --parallel 2")))
    stream = client(b).chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=48, stream=True,
                                               stream_options={"include_usage": True})
    arrivals, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
        if chunk.usage:
            usage = chunk.usage
    assert len(arrivals) > 5
    assert arrivals[-1] - arrivals[0] > 0.05  # tokens arrived over time, not in one buffered burst
    assert usage is not None and usage.completion_tokens >= len(arrivals)

    async def async_stream() -> tuple[int, bool]:
        aclient = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="none", max_retries=0)
        stream = await aclient.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=24,
                                                       stream=True, stream_options={"include_usage": True})
        pieces, saw_usage = 0, False
        async for chunk in stream:
            pieces += bool(chunk.choices and chunk.choices[0].delta.content)
            saw_usage |= chunk.usage is not None
        await aclient.close()
        return pieces, saw_usage

    pieces, saw_usage = asyncio.run(async_stream())
    assert pieces > 3 and saw_usage
    raw = requests.post(b.url + "/v1/chat/completions", timeout=60,
                        json={"model": "gemma", "messages": MESSAGES, "max_tokens": 8, "stream": True})
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_embeddings(berth, start_port, model_cmd):
    b = berth(one_model(start_port, model_cmd("-c 1024 --embeddings --pooling mean")))
    result = client(b).embeddings.create(model="gemma", input=["hello world", "goodbye"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) > 100
    assert result.data[0].embedding != result.data[1].embedding


def two_ids_on_one_gguf(start_port: int, model_cmd, memory: str) -> str:
    return f"""
startPort: {start_port}
memory: {memory}
models:
  small: {{cmd: "{model_cmd('-c 512')}"}}
  large: {{cmd: "{model_cmd('-c 1536')}"}}
"""


def n_ctx(b: BerthServer, model: str) -> int:
    props = requests.get(b.url + "/props", params={"model": model}, timeout=60)
    assert props.status_code == 200, props.text
    return props.json()["default_generation_settings"]["n_ctx"]


@pytest.mark.parametrize("memory", ["{scheduling: false}", "{budget: {ram: 600MiB}, headroom: 0}"])
def test_two_ids_on_one_gguf_swap(berth, start_port, model_cmd, memory):
    """llama-swap's swap, and the memory scheduler's when a budget holds only one of them."""
    b = berth(two_ids_on_one_gguf(start_port, model_cmd, memory))
    assert n_ctx(b, "small") == 512
    small_pid = b.pid_of("small")
    assert n_ctx(b, "large") == 1536
    assert list(b.running()) == ["large"] and not pid_alive(small_pid)
    reply = client(b).chat.completions.create(model="small", messages=MESSAGES, max_tokens=8)
    assert reply.choices[0].message.content.strip() and list(b.running()) == ["small"]


def test_two_ids_on_one_gguf_run_together_when_memory_allows(berth, start_port, model_cmd):
    b = berth(two_ids_on_one_gguf(start_port, model_cmd, "{budget: {ram: 4GiB}}"))
    assert n_ctx(b, "small") == 512
    assert n_ctx(b, "large") == 1536
    running = b.running()
    assert set(running) == {"small", "large"}
    for entry in running.values():
        assert entry["memory"]["planned_bytes"]["host"] > 300 * 1024**2  # a real plan, not a placeholder


def test_estimate_is_within_15_percent_of_measured_host_usage(berth, start_port, model_cmd, tmp_path):
    """The pure estimate (`berth fit`) against the peak resident memory berth measures after a request."""
    config = one_model(start_port, model_cmd("-c 4096 --parallel 2"))
    path = tmp_path / "fit.yaml"
    path.write_text(config)
    fit = subprocess.run([sys.executable, "-m", "berth.cli", "fit", "gemma", "-c", str(path), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert fit.returncode == 0, fit.stderr
    estimated = json.loads(fit.stdout)["devices"]["host"]["total_bytes"]
    b = berth(config)
    client(b).chat.completions.create(model="gemma", messages=[{"role": "user", "content": "hello " * 300}],
                                      max_tokens=16)
    with open(f"/proc/{b.pid_of('gemma')}/status") as fh:  # the peak resident memory, read directly
        measured = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    wait_until(lambda: "measured_bytes" in b.running()["gemma"]["memory"], 60, "berth's own measurement")
    assert 0 < b.running()["gemma"]["memory"]["measured_bytes"]["host"] <= measured
    assert abs(estimated - measured) / measured <= 0.15, (estimated, measured)


def test_ttl_unload_then_reload(berth, start_port, model_cmd):
    b = berth(one_model(start_port, model_cmd("-c 1024"), extra="    ttl: 1"))
    client(b).chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=4)
    pid = b.pid_of("gemma")
    wait_until(lambda: b.running() == {}, 15, "TTL unload")
    assert not pid_alive(pid)
    reply = client(b).chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content.strip()
    assert b.pid_of("gemma") not in (None, pid)


def test_kill_9_mid_stream_then_next_request_succeeds(berth, start_port, model_cmd):
    b = berth(one_model(start_port, model_cmd("-c 2048")))
    stream = client(b).chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=1000, stream=True,
                                               extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError) as info:
        for i, _ in enumerate(stream):
            if i == 2:
                os.kill(b.pid_of("gemma"), signal.SIGKILL)
    assert "stopped answering mid-stream" in str(info.value)
    wait_until(lambda: "gemma" not in b.running(), 10, "crash to be noticed")
    reply = client(b).chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content.strip()


def test_missing_model_file_is_a_clear_503_within_seconds(berth, start_port, engine, tmp_path):
    cmd = f"{engine} -m {tmp_path}/missing.gguf --port ${{PORT}}"
    b = berth(one_model(start_port, cmd))
    r = requests.post(b.url + "/v1/chat/completions", json={"model": "gemma", "messages": MESSAGES}, timeout=60)
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    # "exited ... before it was ready": the fast path, not the 60 s health timeout
    assert "failed to start" in message and "before it was ready" in message and "missing.gguf" in message


def test_sigterm_to_berth_leaves_no_process(berth, start_port, model_cmd):
    b = berth(one_model(start_port, model_cmd("-c 1024")))
    client(b).chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=4)
    descendants = children_of(b.proc.pid)
    assert b.pid_of("gemma") in descendants
    assert b.stop(signal.SIGTERM) == 0
    assert not any(pid_alive(p) for p in descendants)
