"""The facts behind the dashboard, as a script reads them: each model's events with the scheduler's reasons
(/api/events), the requests in flight and recent with captured bodies (/api/requests), and an admin's cancel
of a streaming answer. Scopes hold for each."""

from __future__ import annotations

import json
import threading

import requests

from tests.support.harness import fake_cmd, wait_until

GiB = 1024**3
ADMIN = {"Authorization": "Bearer admin-key"}
WATCHER = {"Authorization": "Bearer watch-key"}  # logs and metrics, no admin
CHATTER = {"Authorization": "Bearer chat-key"}  # inference only


def config(start_port: int, capture: bool = False) -> str:
    return f"""
startPort: {start_port}
captureBodies: {str(capture).lower()}
memory: {{budget: {{ram: 1.5GiB}}, headroom: 0}}
apiKeys:
  - admin-key
  - {{name: watch, key: watch-key, scopes: [logs, metrics]}}
  - {{name: chat, key: chat-key, scopes: [inference]}}
models:
  a:
    cmd: {fake_cmd('a')}
    memory: {{ram: 1GiB}}
  b:
    cmd: {fake_cmd('b')}
    memory: {{ram: 1GiB}}
  slow:
    cmd: {fake_cmd('slow', '--chunks', '200', '--chunk-delay', '0.1')}
    memory: {{ram: 0.25GiB}}
"""


def chat(url: str, model: str, headers=ADMIN, **extra) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def streaming_request(url: str) -> dict:
    """The one request whose answer is streaming (cancellable), once there is one."""
    def streaming() -> list[dict]:
        listed = requests.get(url + "/api/requests", headers=WATCHER, timeout=5).json()["requests"]
        return [q for q in listed if q["in_flight"] and q["cancellable"]]
    wait_until(lambda: streaming(), timeout=20, what="the stream to be under way")
    [entry] = streaming()
    return entry


def test_an_eviction_is_an_event_with_its_reason_as_data_and_in_words(berth, start_port):
    b = berth(config(start_port))
    assert chat(b.url, "a").status_code == 200
    assert chat(b.url, "b").status_code == 200
    answer = requests.get(b.url + "/api/events", headers=WATCHER, timeout=5).json()
    kinds = [(e["model"], e["kind"]) for e in answer["events"]]
    assert kinds[:2] == [("a", "start"), ("a", "ready")]
    assert ("a", "stop") in kinds and ("a", "stopped") in kinds and kinds[-1] == ("b", "ready")
    [stop] = [e for e in answer["events"] if e["kind"] == "stop"]
    assert stop["reason"] == "memory"
    assert stop["why"]["for_model"] == "b" and stop["why"]["rule"] == "lru"
    assert stop["why"]["need_bytes"] == {"host": GiB} and stop["why"]["short_bytes"] == {"host": GiB // 2}
    assert stop["why"]["freed_bytes"] == {"host": GiB} and stop["why"]["idle_s"] >= 0
    assert stop["text"].startswith("evicted for b: needs 1.0 GiB on host (512.0 MiB short), a idle ")
    assert stop["text"].endswith(" s, least recently used")
    later = requests.get(b.url + "/api/events", params={"since": stop["seq"]}, headers=WATCHER, timeout=5).json()
    assert [e["seq"] for e in later["events"]] == [e["seq"] for e in answer["events"] if e["seq"] > stop["seq"]]
    assert later["last"] == answer["last"] and later["dropped"] == 0
    only_b = requests.get(b.url + "/api/events", params={"model": "b"}, headers=WATCHER, timeout=5).json()
    assert {e["model"] for e in only_b["events"]} == {"b"}
    bad = requests.get(b.url + "/api/events", params={"since": "yesterday"}, headers=WATCHER, timeout=5)
    assert bad.status_code == 400 and "not an event number" in bad.json()["error"]["message"]
    assert requests.get(b.url + "/ui/api/events", headers=CHATTER, timeout=5).status_code == 403
    assert "a crashed" not in requests.get(b.url + "/logs", headers=ADMIN, timeout=5).text  # a planned stop
    devices = requests.get(b.url + "/running", headers=WATCHER, timeout=5).json()["devices"]
    assert devices["host"]["headroom_bytes"] == 0 and devices["host"]["budget_bytes"] == int(1.5 * GiB)


def test_a_crash_is_an_event_with_its_exit_code(berth, start_port):
    b = berth(config(start_port))
    requests.post(b.url + "/v1/chat/completions", headers=ADMIN, timeout=30, json={
        "model": "a", "stream": True, "crash_after_chunks": 1, "messages": [{"role": "user", "content": "hi"}]})
    wait_until(lambda: any(e["kind"] == "crashed" for e in requests.get(
        b.url + "/api/events", headers=WATCHER, timeout=5).json()["events"]), timeout=10, what="the crash event")
    events = requests.get(b.url + "/api/events", headers=WATCHER, timeout=5).json()["events"]
    [crash] = [e for e in events if e["kind"] == "crashed"]
    assert crash["model"] == "a" and crash["why"] == {"exit_code": -9} and crash["text"] == "crashed (exit code -9)"
    assert "stopped" not in [e["kind"] for e in events]


def test_requests_list_ttft_and_tokens_and_bodies_only_when_captured(berth, start_port):
    b = berth(config(start_port))
    assert chat(b.url, "a", stream=True, api_key="sk-secret").status_code == 200
    [entry] = requests.get(b.url + "/api/requests", headers=WATCHER, timeout=5).json()["requests"]
    assert entry["model"] == "a" and entry["key"] is not None
    assert entry["completion_tokens"] == 5 and entry["ttft_s"] is not None and entry["ttft_s"] >= 0
    assert entry["in_flight"] is False and entry["outcome"] == "answered" and entry["captured"] is False
    detail = requests.get(b.url + f"/api/requests/{entry['id']}", headers=WATCHER, timeout=5).json()
    assert detail["request_body"] is None and detail["response_body"] is None  # captureBodies is off by default
    assert requests.get(b.url + "/api/requests", headers=CHATTER, timeout=5).status_code == 403
    missing = requests.get(b.url + "/api/requests/999", headers=WATCHER, timeout=5)
    assert missing.status_code == 404 and "GET /api/requests lists them" in missing.json()["error"]["message"]


def test_captured_bodies_are_redacted(berth, start_port):
    b = berth(config(start_port, capture=True))
    image = "data:image/png;base64," + "A" * 400
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": image}}]
    response = requests.post(b.url + "/v1/chat/completions", headers=ADMIN, timeout=30, json={
        "model": "a", "stream": True, "api_key": "sk-secret", "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200
    [entry] = requests.get(b.url + "/api/requests", headers=WATCHER, timeout=5).json()["requests"]
    assert entry["captured"] is True
    detail = requests.get(b.url + f"/ui/api/requests/{entry['id']}", headers=WATCHER, timeout=5).json()
    sent = json.loads(detail["request_body"])
    assert sent["api_key"] == "[redacted]" and "sk-secret" not in detail["request_body"]
    assert sent["messages"][0]["content"][1]["image_url"]["url"] == "data:image/png;base64,[300 bytes]"
    assert "tok0" in detail["response_body"] and "[DONE]" in detail["response_body"]


def test_an_admin_cancels_a_streaming_answer_the_client_gets_its_end_and_the_ledger_says_so(berth, start_port):
    b = berth(config(start_port))
    received: dict = {}

    def slow_stream() -> None:
        with chat(b.url, "a", stream=True, chunks=200, chunk_delay=0.1) as response:
            received["status"] = response.status_code
            received["text"] = response.text  # read to the end: the cancel must end it

    client = threading.Thread(target=slow_stream)
    client.start()
    try:
        entry = streaming_request(b.url)
        refused = requests.post(b.url + f"/api/requests/{entry['id']}/cancel", headers=WATCHER, timeout=5)
        assert refused.status_code == 403  # cancelling is admin's
        cancelled = requests.post(b.url + f"/ui/api/requests/{entry['id']}/cancel", headers=ADMIN, timeout=5)
        assert cancelled.status_code == 200 and cancelled.json() == {"id": entry["id"], "cancelled": True}
        client.join(timeout=20)
        assert not client.is_alive()
    finally:
        client.join(timeout=30)
    assert received["status"] == 200
    assert "cancelled by an admin" in received["text"] and received["text"].rstrip().endswith("data: [DONE]")
    assert "tok199" not in received["text"]
    [entry] = requests.get(b.url + "/api/requests", headers=WATCHER, timeout=5).json()["requests"]
    assert entry["outcome"] == "cancelled" and entry["in_flight"] is False
    again = requests.post(b.url + f"/api/requests/{entry['id']}/cancel", headers=ADMIN, timeout=5)
    assert again.status_code == 409 and "ended already" in again.json()["error"]["message"]
    wait_until(lambda: "stream aborted by client" in requests.get(b.url + "/logs", headers=ADMIN, timeout=5).text,
               timeout=10, what="the model server to see its request dropped")
    assert chat(b.url, "a").status_code == 200  # the model serves on


def test_a_cancelled_ollama_stream_ends_with_an_error_line_in_ollamas_shape(berth, start_port):
    b = berth(config(start_port))
    received: dict = {}

    def ollama_stream() -> None:
        body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with requests.post(b.url + "/api/chat", json=body, headers=ADMIN, timeout=30, stream=True) as response:
            received["status"] = response.status_code
            received["lines"] = [json.loads(line) for line in response.iter_lines() if line]

    client = threading.Thread(target=ollama_stream)
    client.start()
    try:
        entry = streaming_request(b.url)
        assert requests.post(b.url + f"/api/requests/{entry['id']}/cancel", headers=ADMIN, timeout=5).ok
    finally:
        client.join(timeout=30)
    assert received["status"] == 200
    assert "cancelled by an admin" in received["lines"][-1]["error"]
    assert len(received["lines"]) < 200
    [entry] = requests.get(b.url + "/api/requests", headers=WATCHER, timeout=5).json()["requests"]
    assert entry["outcome"] == "cancelled"
