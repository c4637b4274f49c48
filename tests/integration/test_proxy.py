"""berth's proxy between clients and model servers: what it sends on, what it answers, what llama-server's
connection handling does to it."""

from __future__ import annotations

import json

from openai import OpenAI

from tests.support.harness import stand_in_cmd


def test_a_pooled_connection_the_model_server_closed_is_sent_again_on_a_new_one(berth, start_port, tmp_path):
    """llama-server closes its connection after every streamed answer while announcing keep-alive; a request
    sent on that pooled connection before berth sees the close meets a reset before any answer byte. The
    stand-in makes that happen to every request after the first (--stale-after-stream): berth must send each
    again on a new connection, and the client must never see it."""
    events = tmp_path / "events.jsonl"
    b = berth(f"""
startPort: {start_port}
models:
  m:
    cmd: {stand_in_cmd('--alias', 'm', '--token-ms', '0.2', '--stale-after-stream', '--events', str(events))}
""")
    client = OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0)
    for _ in range(6):
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == "tok0 tok1 tok2 tok3 "
    resets = [e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "reset"]
    assert len(resets) >= 5  # every request after the first went out on a connection the stand-in then reset
