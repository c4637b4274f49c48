"""Whose turn it is, end to end with stand-in model servers: batching before a swap (maxWait,
minResidency) and returnTo after a TTL unload."""

from __future__ import annotations

import threading

import pytest
import requests

from tests.support.harness import fake_cmd, start_log_lines, wait_until


def chat(url: str, model: str, **extra) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", timeout=60,
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def two_that_cannot_share(start_port: int, tmp_path, top: str = "", per_model: dict[str, str] | None = None) -> str:
    """`a` and `b` declared at 600 MiB in a 1 GiB budget: one at a time."""
    log = tmp_path / "starts.log"
    models = "".join(f"  {m}:\n    cmd: {fake_cmd(m, '--start-log', str(log))}\n    memory: {{ram: 600MiB}}\n"
                     + "".join(f"    {line}\n" for line in (per_model or {}).get(m, "").split(";") if line)
                     for m in ("a", "b"))
    return (f"startPort: {start_port}\nhealthCheckTimeout: 20\n{top}\n"
            f"memory: {{budget: {{ram: 1GiB}}, headroom: 0}}\nmodels:\n{models}")


@pytest.mark.parametrize("policy, a_again_from_the_same_process", [("", True), ("maxWait: 0\nminResidency: 0", False)],
                         ids=["batching (defaults)", "fifo"])
def test_the_loaded_model_serves_a_later_request_before_the_swap_another_waits_for(
        berth, start_port, tmp_path, policy, a_again_from_the_same_process):
    b = berth(two_that_cannot_share(start_port, tmp_path, policy))
    assert chat(b.url, "a").status_code == 200
    answers: dict[str, requests.Response] = {}
    busy = threading.Thread(target=lambda: answers.update(a1=chat(b.url, "a", sleep=3)))
    busy.start()
    waiting = threading.Thread(target=lambda: answers.update(b1=chat(b.url, "b")))
    try:
        wait_until(lambda: b.running()["a"]["in_flight"] == 1, 10, "a's long request to be in flight")
        waiting.start()
        wait_until(lambda: b.running()["b"]["queued"] == 1 if "b" in b.running() else False, 10, "b's request to wait")
        a2 = chat(b.url, "a")  # sent while a is busy and b waits
    finally:
        busy.join()
        waiting.join()
    assert a2.status_code == answers["a1"].status_code == answers["b1"].status_code == 200
    same = a2.json()["pid"] == answers["a1"].json()["pid"]
    assert same is a_again_from_the_same_process
    starts = [line.split()[0] for line in start_log_lines(tmp_path / "starts.log")]
    # batching: a serves its later request at once, then b gets its turn; fifo: a drains for b, then comes back
    assert starts == (["a", "b"] if a_again_from_the_same_process else ["a", "b", "a"])


def test_return_to_loads_the_baseline_again_after_a_ttl_unload(berth, start_port, tmp_path):
    b = berth(two_that_cannot_share(start_port, tmp_path, "returnTo: a", {"b": "ttl: 1"}))
    assert chat(b.url, "a").status_code == 200
    assert chat(b.url, "b").status_code == 200  # a is evicted to make room
    assert list(b.running()) == ["b"]
    wait_until(lambda: [line.split()[0] for line in start_log_lines(tmp_path / "starts.log")] == ["a", "b", "a"],
               20, "a to start again after b's TTL")
    wait_until(lambda: {m: r["state"] for m, r in b.running().items()} == {"a": "ready"}, 20, "a to be ready")
    assert "stopping b (ttl)" in b.output()
    assert chat(b.url, "a").json()["server"] == "a"
    assert len(start_log_lines(tmp_path / "starts.log")) == 3  # the request found a warm


def test_no_return_after_an_unload_asked_for(berth, start_port, tmp_path):
    b = berth(two_that_cannot_share(start_port, tmp_path, "returnTo: a", {"b": "ttl: 60"}))
    assert chat(b.url, "b").status_code == 200
    assert requests.post(b.url + "/api/models/unload/b", timeout=30).status_code == 200
    assert b.running() == {}
    assert [line.split()[0] for line in start_log_lines(tmp_path / "starts.log")] == ["b"]
