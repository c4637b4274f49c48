"""berth's proxy between clients and model servers: what it sends on, what it answers, what llama-server's
connection handling does to it."""

from __future__ import annotations

import json

from openai import OpenAI

from tests.support.harness import stand_in_cmd, wait_until


def stand_in_events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line] if path.exists() else []


def requests_seen(path) -> list[dict]:
    """The requests the stand-in was sent, in order (its --events)."""
    return [e for e in stand_in_events(path) if e["event"] == "request"]


def spare_opened_after(path, chats: int) -> bool:
    """Whether the stand-in has answered a health check after its `chats`-th chat request: the spare berth
    opens once a streamed answer ends."""
    seen = requests_seen(path)
    chat_at = [k for k, r in enumerate(seen) if r["path"] == "/v1/chat/completions"]
    return len(chat_at) >= chats and any(r["path"] == "/health" for r in seen[chat_at[chats - 1]:])


def stream_text(client: OpenAI, model: str) -> str:
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_a_streamed_answer_leaves_a_spare_connection_the_next_request_goes_out_on(berth, start_port, tmp_path):
    """llama-server closes the connection it streamed on, so the model's next request would have to connect
    first, while the client waits for its first token. berth opens a spare meanwhile (the model's health
    check, on the connection pool requests are sent from), and the next request goes out on it."""
    events = tmp_path / "events.jsonl"
    b = berth(f"""
startPort: {start_port}
models:
  m:
    cmd: {stand_in_cmd('--alias', 'm', '--token-ms', '0.2', '--events', str(events))}
""")
    client = OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0)
    assert stream_text(client, "m") == "tok0 tok1 tok2 tok3 "
    wait_until(lambda: spare_opened_after(events, 1), 10, "the spare connection's health check")
    assert stream_text(client, "m") == "tok0 tok1 tok2 tok3 "
    seen = requests_seen(events)
    first, second = [k for k, r in enumerate(seen) if r["path"] == "/v1/chat/completions"]
    spare = next(r for r in seen[first:second] if r["path"] == "/health")
    assert seen[second]["connection"] == spare["connection"] != seen[first]["connection"]
    # a whole (not streamed) answer leaves its connection open: no spare after it
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message.content == "tok0 tok1 "
    wait_until(lambda: spare_opened_after(events, 2), 10, "the second spare")
    spares_before = sum(1 for r in requests_seen(events) if r["path"] == "/health")
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message.content == "tok0 tok1 "
    assert sum(1 for r in requests_seen(events) if r["path"] == "/health") == spares_before


def test_a_pooled_connection_the_model_server_closed_is_sent_again_on_a_new_one(berth, start_port, tmp_path):
    """A server may close an idle keep-alive connection (llama-server after 5 s) just as a request is sent on
    it from the pool; the request meets a reset before any answer byte. The stand-in makes that happen to
    every connection it has answered on (--stale-after-answer), so each chat request after the first, sent
    on the spare connection a health check left, meets one: berth must send each again on a new connection,
    and the client must never see it."""
    events = tmp_path / "events.jsonl"
    b = berth(f"""
startPort: {start_port}
models:
  m:
    cmd: {stand_in_cmd('--alias', 'm', '--token-ms', '0.2', '--stale-after-answer', '--events', str(events))}
""")
    client = OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0)
    for chats in range(1, 7):
        assert stream_text(client, "m") == "tok0 tok1 tok2 tok3 "
        wait_until(lambda chats=chats: spare_opened_after(events, chats), 10, "the spare connection's health check")
    resets = [e for e in stand_in_events(events) if e["event"] == "reset"]
    assert sum(1 for e in resets if e["request"].startswith("POST /v1/chat/completions")) >= 5
