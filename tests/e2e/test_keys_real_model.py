"""Usage per key on the real model server (both engines): what berth counts equals what llama.cpp reported,
from `usage` or, in a stream without include_usage, from its `timings`."""

from __future__ import annotations

import json

import openai
import requests

KEY = "alice-secret"
MESSAGES = [{"role": "user", "content": "Name three colors."}]


def reported_tokens(stream: bytes) -> tuple[int, int]:
    """(prompt, completion) from the last chunk of a raw stream that carries `usage` or `timings`.
    Lines are split on the bytes SSE ends them with: str.splitlines would also split inside a chunk's text
    at U+0085 or U+2028, which a model may write and JSON leaves unescaped."""
    found = (0, 0)
    for line in stream.decode("utf-8").split("\n"):
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[len("data: "):])
        if chunk.get("usage"):
            found = (chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"])
        elif chunk.get("timings"):
            timings = chunk["timings"]
            found = (timings["prompt_n"] + timings.get("cache_n", 0), timings["predicted_n"])
    return found


def test_usage_per_key_equals_what_llama_cpp_reported(berth, start_port, model_cmd, tmp_path):
    b = berth(f"""
startPort: {start_port}
healthCheckTimeout: 60
apiKeys:
  - {{name: alice, key: {KEY}}}
models:
  gemma:
    cmd: {model_cmd("-c 1024 -np 2")}
""", env={"BERTH_HOME": str(tmp_path / "home")})
    client = openai.OpenAI(base_url=b.url + "/v1", api_key=KEY, max_retries=0)
    whole = client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=16)
    assert whole.usage is not None
    raw = requests.post(b.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                        json={"model": "gemma", "messages": MESSAGES, "max_tokens": 12, "stream": True})
    streamed = reported_tokens(raw.content)  # no include_usage: what llama.cpp says at the end of the stream
    assert streamed[1] > 0
    usage = requests.get(b.url + "/api/usage", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()
    [alice] = usage["keys"]
    assert alice["requests"] == 2 and alice["errors"] == 0
    assert alice["prompt_tokens"] == whole.usage.prompt_tokens + streamed[0]
    assert alice["completion_tokens"] == whole.usage.completion_tokens + streamed[1]
