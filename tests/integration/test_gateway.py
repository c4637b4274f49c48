"""Scenario tests: real berth process, real fake model server subprocesses, real sockets."""

from __future__ import annotations

import base64
import gzip
import json
import re
import select
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support.harness import (
    children_of, closed_by_server, fake_cmd, pid_alive, start_log_lines, wait_until,
)


JSON_BODY = {"Content-Type": "application/json"}  # what a body that says it is JSON is sent with


def queue_depth(b) -> float:
    """Requests waiting for a model, from berth's own /metrics."""
    for line in requests.get(b.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("berth_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no berth_queue_depth in /metrics")


def chat(url: str, model: str | None, timeout: float = 30, **extra) -> requests.Response:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    if model is not None:
        body["model"] = model
    return requests.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def two_models(start_port: int, tmp_path, flags_a=(), flags_b=(), extra: str = "", limit: int = 10) -> str:
    log = tmp_path / "starts.log"
    return f"""
startPort: {start_port}
healthCheckTimeout: 20
{extra}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a:
    concurrencyLimit: {limit}
    cmd: {fake_cmd('a', '--start-log', str(log), *flags_a)}
  b:
    cmd: {fake_cmd('b', '--start-log', str(log), *flags_b)}
"""


def test_start_serve_and_unload(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path))
    assert b.running() == {}
    r = chat(b.url, "a")
    assert r.status_code == 200 and r.json()["server"] == "a"
    pid = b.pid_of("a")
    assert pid and pid_alive(pid)
    assert requests.post(b.url + "/unload", timeout=30).text == "OK"
    assert b.running() == {}
    wait_until(lambda: not pid_alive(pid), 5, "model process to exit")


def test_swap_stops_the_other_model(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path))
    assert chat(b.url, "a").json()["server"] == "a"
    pid_a = b.pid_of("a")
    assert chat(b.url, "b").json()["server"] == "b"
    assert list(b.running()) == ["b"]
    assert not pid_alive(pid_a)
    metrics = requests.get(b.url + "/metrics").text
    assert "berth_swaps_total 1.0" in metrics


def test_twenty_concurrent_requests_join_one_load(berth, start_port, tmp_path):
    # concurrencyLimit counts waiting requests too (as llama-swap's does), so room for all twenty
    b = berth(two_models(start_port, tmp_path, flags_a=("--load-delay", "1"), limit=20))
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: chat(b.url, "a"), range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.json()["pid"] for r in responses}) == 1
    assert len(start_log_lines(tmp_path / "starts.log")) == 1


def test_swap_waits_for_in_flight_request_and_queue_keeps_arrival_order(berth, start_port, tmp_path):
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a: {{cmd: "{fake_cmd('a')}"}}
  b: {{cmd: "{fake_cmd('b')}"}}
  c: {{cmd: "{fake_cmd('c')}"}}
"""
    b = berth(config)
    chat(b.url, "a")
    finished: dict[str, float] = {}

    def run(model: str, sleep: float) -> requests.Response:
        r = chat(b.url, model, sleep=sleep)
        finished[model] = time.monotonic()
        return r

    with ThreadPoolExecutor(3) as pool:
        slow_a = pool.submit(run, "a", 1.5)
        wait_until(lambda: b.running()["a"]["in_flight"] == 1, 10, "a's request to be in flight")
        then_b = pool.submit(run, "b", 0)
        wait_until(lambda: queue_depth(b) == 1, 10, "b's request to wait")
        then_c = pool.submit(run, "c", 0)
        wait_until(lambda: queue_depth(b) == 2, 10, "c's request to wait behind b's")
        results = [slow_a.result(), then_b.result(), then_c.result()]
    assert [r.json()["server"] for r in results] == ["a", "b", "c"]
    assert finished["a"] < finished["b"] < finished["c"]


def test_ready_model_is_served_while_another_group_loads(berth, start_port, tmp_path):
    config = two_models(start_port, tmp_path, flags_b=("--load-delay", "5"), extra="""
groups:
  one: {swap: true, exclusive: false, members: [a]}
  two: {swap: true, exclusive: false, members: [b]}
""")
    b = berth(config)
    chat(b.url, "a")
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(chat, b.url, "b")
        wait_until(lambda: b.running().get("b", {}).get("state") == "starting", 10, "b to be loading")
        assert chat(b.url, "a").status_code == 200
        assert not loading.done()  # a was answered while b was still loading
        assert loading.result().status_code == 200
    assert set(b.running()) == {"a", "b"}


def test_ttl_unloads_idle_model_and_requests_reset_it(berth, start_port, tmp_path):
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a:
    ttl: 2
    cmd: {fake_cmd('a')}
"""
    b = berth(config)
    chat(b.url, "a")
    pid = b.pid_of("a")
    for _ in range(3):  # each request, sent when the TTL has half run out, starts it over
        wait_until(lambda: b.running()["a"]["ttl_remaining_s"] < 1.0, 5, "the TTL to run down")
        assert chat(b.url, "a").json()["pid"] == pid
        assert b.running()["a"]["ttl_remaining_s"] > 1.5
    r = chat(b.url, "a", sleep=2.5)  # a request longer than the TTL never gets cut
    assert r.status_code == 200 and r.json()["pid"] == pid
    wait_until(lambda: b.running() == {}, 5, "TTL unload")
    assert not pid_alive(pid)


def test_crash_mid_stream_reports_error_then_restarts(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path))
    chat(b.url, "a")
    old_pid = b.pid_of("a")
    r = requests.post(b.url + "/v1/chat/completions", timeout=30,
                      json={"model": "a", "stream": True, "chunks": 5, "crash_after_chunks": 2})
    assert r.status_code == 200
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert "tok1" in events[1]
    assert json.loads(events[-1][6:])["error"]["code"] == "upstream_error"
    wait_until(lambda: "a" not in b.running(), 5, "crash to be noticed")
    r = chat(b.url, "a")
    assert r.status_code == 200 and r.json()["pid"] != old_pid
    assert 'berth_model_crashes_total{model="a"} 1.0' in requests.get(b.url + "/metrics").text


def test_exit_before_healthy_fails_fast_with_log_lines(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path, flags_a=("--exit-at-start", "3")))
    r = chat(b.url, "a")
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "model_start_failed"
    assert "exited with code 3" in error["message"]
    assert "could not load model file" in error["message"]
    assert b.running() == {}
    assert [m["state"] for m in requests.get(b.url + "/v1/models").json()["data"] if m["id"] == "a"] == ["failed"]


def test_health_timeout_kills_the_process(berth, start_port, tmp_path):
    pid_file = tmp_path / "pid"
    config = f"""
startPort: {start_port}
healthCheckTimeout: 1
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a:
    cmd: {fake_cmd('a', '--never-healthy', '--pid-file', str(pid_file))}
"""
    b = berth(config)
    r = chat(b.url, "a")
    assert r.status_code == 503
    assert "healthCheckTimeout" in r.json()["error"]["message"]
    pid = int(pid_file.read_text())
    wait_until(lambda: not pid_alive(pid), 5, "unhealthy process to be killed")


def test_sigterm_ignoring_server_gets_sigkill_and_grandchild_is_reaped(berth, start_port, tmp_path):
    grandchild_file = tmp_path / "grandchild"
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a:
    unloadTimeout: 0.5
    cmd: {fake_cmd('a', '--ignore-sigterm', '--grandchild-pid-file', str(grandchild_file))}
"""
    b = berth(config)
    chat(b.url, "a")
    pid = b.pid_of("a")
    grandchild = int(grandchild_file.read_text())
    assert pid_alive(grandchild)
    began = time.monotonic()
    requests.post(b.url + "/unload", timeout=30)
    assert time.monotonic() - began >= 0.5  # it waited unloadTimeout for SIGTERM first
    assert not pid_alive(pid) and not pid_alive(grandchild)
    assert "sending SIGKILL" in requests.get(b.url + "/logs").text


def test_cmd_stop_is_used_with_pid(berth, start_port, tmp_path):
    marker = tmp_path / "stopped-pid"
    script = "import os,sys; open(sys.argv[1],'w').write(sys.argv[2]); os.kill(int(sys.argv[2]), 15)"
    stopper = f'{sys.executable} -c "{script}"'
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a:
    cmd: {fake_cmd('a')}
    cmdStop: {stopper} {marker} ${{PID}}
"""
    b = berth(config)
    chat(b.url, "a")
    pid = b.pid_of("a")
    requests.post(b.url + "/unload", timeout=30)
    assert marker.read_text() == str(pid)
    assert not pid_alive(pid)


def test_env_is_passed(berth, start_port):
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a:
    cmd: {fake_cmd('a')}
    env: ["FAKE_GREETING=hello world", "FAKE_MODEL=${{MODEL_ID}}"]
"""
    b = berth(config)
    r = requests.post(b.url + "/v1/completions", json={"model": "a", "prompt": "x"}, timeout=30)
    assert r.json()["env"] == {"FAKE_GREETING": "hello world", "FAKE_MODEL": "a"}


def test_concurrency_limit_answers_429_with_retry_after(berth, start_port):
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a:
    concurrencyLimit: 2
    cmd: {fake_cmd('a')}
"""
    b = berth(config)
    chat(b.url, "a")
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(chat, b.url, "a", 30, sleep=1.0) for _ in range(2)]
        wait_until(lambda: b.running()["a"]["in_flight"] == 2, 10, "both requests to be in flight")
        r = chat(b.url, "a")
        assert [f.result().status_code for f in slow] == [200, 200]
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "concurrency_limit"


def test_request_errors_use_openai_shape(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path, extra="maxBodyBytes: 2000"))
    r = chat(b.url, "nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and "a, b" in r.json()["error"]["message"]
    r = requests.post(b.url + "/v1/chat/completions", data=b"{not json", timeout=5, headers=JSON_BODY)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = chat(b.url, None)
    assert r.status_code == 400 and "a, b" in r.json()["error"]["message"]
    r = requests.post(b.url + "/v1/chat/completions", json={"model": "a", "pad": "x" * 5000}, timeout=5)
    assert r.status_code == 413 and "maxBodyBytes" in r.json()["error"]["message"]
    r = requests.get(b.url + "/nothing-here", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_request_without_model_goes_to_default_alias(berth, start_port, tmp_path):
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a: {{cmd: "{fake_cmd('a')}", aliases: [default]}}
  b: {{cmd: "{fake_cmd('b')}"}}
"""
    b = berth(config)
    assert chat(b.url, None).json()["server"] == "a"
    assert chat(b.url, "default").json()["server"] == "a"


def test_api_keys_protect_everything_but_health(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path, extra="apiKeys: [sekret-1, sekret-2]"))
    assert requests.get(b.url + "/health").status_code == 200
    r = chat(b.url, "a")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert requests.get(b.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(b.url + "/metrics").status_code == 401
    assert requests.get(b.url + "/v1/models", headers={"Authorization": "Bearer sekret-2"}).status_code == 200
    assert requests.get(b.url + "/v1/models", headers={"x-api-key": "sekret-1"}).status_code == 200
    basic = base64.b64encode(b"user:sekret-1").decode()
    assert requests.get(b.url + "/v1/models", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    r = requests.post(b.url + "/v1/completions", json={"model": "a"}, headers={"Authorization": "Bearer sekret-1"})
    assert "Authorization" not in r.json()["headers"]  # berth's key is not leaked to the model server
    assert "sekret" not in requests.get(b.url + "/logs", headers={"x-api-key": "sekret-1"}).text


def test_streaming_passes_bytes_unchanged(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path))
    chat(b.url, "a")
    port = int(b.running()["a"]["proxy"].rsplit(":", 1)[1])
    body = {"model": "a", "stream": True, "chunks": 40}
    via_berth = requests.post(b.url + "/v1/chat/completions", json=body, timeout=30)
    direct = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30)
    assert via_berth.headers["Content-Type"].startswith("text/event-stream")
    assert via_berth.content == direct.content
    assert via_berth.content.endswith(b"data: [DONE]\n\n")


def test_stream_arrives_incrementally_with_openai_client(berth, start_port, tmp_path):
    from openai import OpenAI

    b = berth(two_models(start_port, tmp_path))
    client = OpenAI(base_url=b.url + "/v1", api_key="unused")
    arrivals = []
    stream = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], stream=True,
                                            extra_body={"chunks": 4, "chunk_delay": 0.3})
    for chunk in stream:
        if chunk.choices:
            arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    assert [text for _, text in arrivals] == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert arrivals[-1][0] - arrivals[0][0] > 0.6  # not buffered into one burst


def test_client_disconnect_cancels_upstream(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path))
    chat(b.url, "a")
    r = requests.post(b.url + "/v1/chat/completions", stream=True, timeout=30,
                      json={"model": "a", "stream": True, "chunks": 100, "chunk_delay": 0.1})
    next(r.iter_lines())
    r.close()
    # The fake server is still writing; berth must drop the upstream connection, so the
    # request leaves in-flight accounting long before the 10 s the stream would take.
    wait_until(lambda: b.running()["a"]["in_flight"] == 0, 5, "in-flight count to drop")
    wait_until(lambda: "stream aborted by client" in requests.get(b.url + "/logs").text, 5,
               "the model server to see the disconnect")
    assert 'status="499"' in requests.get(b.url + "/metrics").text


def test_use_model_name_filters_upstream_and_query_routing(berth, start_port):
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a:
    cmd: {fake_cmd('a')}
    useModelName: org/real-name
    filters:
      stripParams: temperature
      setParams: {{top_k: 3}}
"""
    b = berth(config)
    r = requests.post(b.url + "/v1/completions", json={"model": "a", "temperature": 2, "prompt": "p"}, timeout=30)
    sent = json.loads(r.json()["body"])
    assert sent == {"model": "org/real-name", "prompt": "p", "top_k": 3}
    props = requests.get(b.url + "/props", params={"model": "a"}, timeout=30).json()
    assert props["path"] == "/props" and props["method"] == "GET"
    upstream = requests.get(b.url + "/upstream/a/some/path?id=1", timeout=30).json()
    assert upstream["path"] == "/some/path" and upstream["query"] == "id=1"


def test_router_mode_model_api(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path, flags_a=("--load-delay", "1")))

    def status(model: str) -> str:
        data = requests.get(b.url + "/models", timeout=5).json()["data"]
        return next(m["status"]["value"] for m in data if m["id"] == model)

    assert status("a") == "unloaded"
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(requests.post, b.url + "/models/load", json={"model": "a"}, timeout=30)
        wait_until(lambda: status("a") == "loading", 5, "loading status")
        assert loading.result().json() == {"success": True}
    assert status("a") == "loaded"
    assert requests.post(b.url + "/models/unload", json={"model": "a"}, timeout=30).json() == {
        "success": True, "unloaded": {"a": "stopped"}}
    assert status("a") == "unloaded"
    r = requests.post(b.url + "/models/load", json={"model": "zzz"}, timeout=30)
    assert r.status_code == 404


def test_v1_models_lists_states_hides_unlisted_and_shows_aliases(berth, start_port):
    config = f"""
startPort: {start_port}
includeAliasesInList: true
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a: {{cmd: "{fake_cmd('a')}", aliases: [alpha], name: Alpha, description: first}}
  hidden: {{cmd: "{fake_cmd('h')}", unlisted: true}}
"""
    b = berth(config)
    data = requests.get(b.url + "/v1/models").json()["data"]
    assert [(m["id"], m["state"]) for m in data] == [("a", "stopped"), ("alpha", "stopped")]
    assert data[0]["name"] == "Alpha" and data[0]["description"] == "first"
    assert chat(b.url, "hidden").status_code == 200  # unlisted, still served


def test_logs_and_log_stream(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path))
    events: list[dict] = []
    with requests.get(b.url + "/ui/api/logs/stream/a", stream=True, timeout=30) as stream:  # the dashboard's
        chat(b.url, "a")
        for line in stream.iter_lines():
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
            if any("fake server a starting" in e["text"] for e in events):
                break
    assert all(e["source"] == "a" for e in events)
    assert "fake server a starting" in requests.get(b.url + "/logs").text

    def first_lines(path: str, count: int) -> list[str]:
        with requests.get(b.url + path, stream=True, timeout=30) as stream:
            assert stream.headers["Content-Type"].startswith("text/plain")
            lines = []
            for line in stream.iter_lines(decode_unicode=True):
                lines.append(line)
                if len(lines) == count:
                    return lines
        return lines

    # llama-swap's raw text: one model's server output as printed; upstream (all models) and proxy (berth)
    own = first_lines("/logs/stream/a", 4)  # berth's lines about the model come prefixed [berth]
    assert own[0].startswith("[berth] launching:")
    assert f"fake server a starting on port {b.running()['a']['port']}" in own
    assert first_lines("/logs/stream/upstream", 1)[0].startswith("[a] fake server a starting")
    assert all(not line.startswith("[a] fake") for line in first_lines("/logs/stream/proxy", 3))
    missing = requests.get(b.url + "/logs/stream/nope", timeout=10)
    assert missing.status_code == 400 and "proxy, upstream or a model id" in missing.json()["error"]["message"]


def test_preload_hook_starts_model_at_startup(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path, extra="hooks:\n  on_startup:\n    preload: [b]"))
    wait_until(lambda: b.running().get("b", {}).get("state") == "ready", 10, "preload")


def test_config_reload_restarts_only_changed_models(berth, start_port, tmp_path):
    def config(b_flag: str) -> str:
        return f"""
startPort: {start_port}
groups:
  all: {{swap: false, exclusive: false, members: [a, b]}}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a: {{cmd: "{fake_cmd('a')}"}}
  b: {{cmd: "{fake_cmd('b', b_flag)}"}}
"""
    b = berth(config("--load-delay=0"), "--watch-config")
    chat(b.url, "a")
    chat(b.url, "b")
    pid_a, pid_b = b.pid_of("a"), b.pid_of("b")
    b.config_path.write_text(config("--load-delay=0.1"))
    wait_until(lambda: "b" not in b.running(), 10, "changed model to stop")
    assert b.pid_of("a") == pid_a
    chat(b.url, "b")
    assert b.pid_of("b") != pid_b
    b.config_path.write_text(config("--load-delay=0.2"))
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "b" not in b.running(), 10, "SIGHUP reload")
    b.config_path.write_text("models: [broken")
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reload failed" in b.output(), 5, "reload error")
    assert chat(b.url, "a").status_code == 200  # the running config stays


def test_sigterm_to_berth_stops_every_model(berth, start_port, tmp_path):
    config = two_models(start_port, tmp_path, extra="""
groups:
  all: {swap: false, exclusive: false, members: [a, b]}
""")
    b = berth(config)
    chat(b.url, "a")
    chat(b.url, "b")
    pids = [b.pid_of("a"), b.pid_of("b")]
    assert b.stop(signal.SIGTERM) == 0
    assert not any(pid_alive(p) for p in pids)


def test_berth_killed_with_sigkill_leaves_no_children(berth, start_port, tmp_path):
    grandchild_file = tmp_path / "grandchild"
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  a:
    cmd: {fake_cmd('a', '--grandchild-pid-file', str(grandchild_file))}
"""
    b = berth(config)
    chat(b.url, "a")
    descendants = children_of(b.proc.pid)
    model_pid, grandchild = b.pid_of("a"), int(grandchild_file.read_text())
    assert {model_pid, grandchild} <= set(descendants)
    b.proc.kill()
    b.proc.wait()
    wait_until(lambda: not any(pid_alive(p) for p in descendants), 10, "orphans to die")


def test_a_port_another_program_holds_is_skipped(berth, tmp_path):
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        b = berth(f"startPort: {taken}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
        r = chat(b.url, "a")
        assert r.status_code == 200, r.text
        port = b.running()["a"]["port"]
        assert port > taken and b.running()["a"]["proxy"] == f"http://127.0.0.1:{port}"
    finally:
        blocker.close()


def test_two_berths_with_one_start_port_both_serve(berth, start_port, tmp_path):
    config = f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n  b: {{cmd: \"{fake_cmd('b')}\"}}\n"
    first, second = berth(config), berth(config)
    for server in (first, second):
        for model in ("a", "b"):
            r = chat(server.url, model)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == f"hello from {model}"
    ports = [s.running()[m]["port"] for s in (first, second) for m in ("a", "b")]
    assert len(set(ports)) == 4 and min(ports) >= start_port


def test_missing_binary_is_a_clear_start_failure(berth, start_port):
    b = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: '/no/such/llama-server --port ${{PORT}}'}}\n")
    r = chat(b.url, "a")
    assert r.status_code == 503 and "command not found: '/no/such/llama-server'" in r.json()["error"]["message"]


def test_warmup_gates_readiness_and_an_empty_answer_fails_the_start(berth, start_port):
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  good: {{warmup: true, cmd: "{fake_cmd('good')}"}}
  mute: {{warmup: true, cmd: "{fake_cmd('mute', '--empty-chat')}"}}
"""
    b = berth(config)
    assert chat(b.url, "good").status_code == 200
    r = chat(b.url, "mute")
    assert r.status_code == 503
    assert "warmup answer was empty" in r.json()["error"]["message"]
    assert "mute" not in b.running()


def test_client_that_leaves_while_waiting_holds_nothing(berth, start_port, tmp_path):
    config = f"""
startPort: {start_port}
memory: {{scheduling: false}}  # these tests pin llama-swap's swap semantics
models:
  slow:
    concurrencyLimit: 1
    cmd: {fake_cmd('slow', '--load-delay', '1.5')}
"""
    b = berth(config)
    try:
        chat(b.url, "slow", timeout=0.5)
    except requests.exceptions.ReadTimeout:
        pass
    else:
        raise AssertionError("the request should still have been waiting for the load")
    # With concurrencyLimit 1, a waiter that was not removed would make this a 429.
    r = chat(b.url, "slow")
    assert r.status_code == 200
    # the lease is released just after the last byte is written, so wait for it rather than race it
    wait_until(lambda: b.running()["slow"]["in_flight"] == 0, 5, "the request to be released")
    assert b.running()["slow"]["queued"] == 0


def test_compressed_responses_pass_through_untouched(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path))
    raw = requests.get(b.url + "/upstream/a/echo?gzip=1", headers={"Accept-Encoding": "gzip"}, stream=True,
                       timeout=30)
    assert raw.headers["Content-Encoding"] == "gzip"
    body = raw.raw.read(decode_content=False)
    assert body[:2] == b"\x1f\x8b"  # still gzip bytes, as the model server sent them
    assert json.loads(gzip.decompress(body))["path"] == "/echo"


def test_a_connection_closed_before_any_answer_is_retried_once(berth, start_port, tmp_path):
    b = berth(two_models(start_port, tmp_path, flags_a=("--drop-first-chat",)))
    r = chat(b.url, "a")
    assert r.status_code == 200 and r.json()["server"] == "a"
    logs = requests.get(b.url + "/logs", timeout=5).text
    assert "dropping the first chat request's connection" in logs  # the first attempt really was cut


def test_model_server_errors_reach_clients_in_openai_shape(berth, start_port):
    """llama.cpp's errors are in OpenAI's shape (with an integer code) and reach clients as sent; a body in
    no such shape is wrapped in it."""
    import openai

    b = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
    r = chat(b.url, "a", llama_error=True)
    assert r.status_code == 501 and r.json() == {"error": {
        "code": 501, "message": "tools param requires --jinja flag", "type": "not_supported_error"}}
    r = chat(b.url, "a", text_error=True)
    assert r.status_code == 500 and r.json()["error"] == {
        "message": "upstream exploded", "type": "server_error", "code": "upstream_http_500",
        "upstream": "upstream exploded"}
    client = openai.OpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
    try:
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"llama_error": True})
        raise AssertionError("expected an error")
    except openai.APIStatusError as exc:
        assert exc.status_code == 501 and exc.body["code"] == 501 and exc.type == "not_supported_error"
    # /upstream/ is the model server's own surface: passed through as sent
    raw = requests.post(b.url + "/upstream/a/v1/chat/completions", json={"llama_error": True}, timeout=10)
    assert raw.status_code == 501 and raw.json()["error"]["code"] == 501


def test_a_crash_is_noticed_when_a_child_of_the_model_keeps_its_output_open(berth, start_port):
    """A wrapper's background job holds the model's stdout; the server's own death must still count."""
    server = fake_cmd("a").replace("--port ${PORT}", "--port $0")
    b = berth(f"startPort: {start_port}\nmodels:\n  a:\n    cmd: sh -c 'sleep 600 & exec {server}' ${{PORT}}\n")
    assert chat(b.url, "a").status_code == 200
    pid = b.pid_of("a")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: "a" not in b.running(), 10, "the crash to be noticed")
    r = chat(b.url, "a")
    assert r.status_code == 200 and b.pid_of("a") != pid


def test_absurdly_nested_json_is_a_400_in_openai_shape(berth, start_port):
    b = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v1/chat/completions", "/models/load"):
        r = requests.post(b.url + path, data=deep, timeout=10, headers=JSON_BODY)
        assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/json")
        assert "nests too deeply" in r.json()["error"]["message"]
    assert chat(b.url, "a").status_code == 200  # and berth goes on serving


def test_unload_answers_under_continuous_traffic_and_says_what_happened(berth, start_port):
    b = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\", concurrencyLimit: 64}}\n")
    assert chat(b.url, "a").status_code == 200
    first_pid = b.pid_of("a")
    stop = time.monotonic() + 20
    statuses: list[int] = []

    def hammer() -> None:
        while time.monotonic() < stop:
            statuses.append(chat(b.url, "a", sleep=0.05).status_code)

    with ThreadPoolExecutor(16) as pool:
        workers = [pool.submit(hammer) for _ in range(16)]
        wait_until(lambda: len(statuses) > 50, 10, "traffic")
        answers = []
        for path in ("/models/unload", "/models/unload", "/unload"):
            began = time.monotonic()
            r = requests.post(b.url + path, json={"model": "a"}, timeout=10)
            answers.append((r, time.monotonic() - began))
        stop = time.monotonic()  # let the clients finish
        for worker in workers:
            worker.result()
    for r, seconds in answers:
        assert r.status_code == 200 and seconds < 10, (r.text, seconds)
    outcome = answers[0][0].json()["unloaded"]["a"]
    assert outcome in ("stopped", "stopped, then restarted by new requests")
    assert b.pid_of("a") != first_pid
    assert set(statuses) <= {200, 503}  # a request caught by the unload may be told to retry; nothing else


def test_sigterm_drains_in_flight_requests_and_ready_turns_503(berth, start_port):
    b = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
    assert requests.get(b.url + "/ready", timeout=5).status_code == 200
    assert chat(b.url, "a").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, b.url, "a", 30, sleep=3)
        wait_until(lambda: b.running()["a"]["in_flight"] == 1, 10, "the slow request")
        b.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: requests.get(b.url + "/ready", timeout=5).status_code == 503, 5, "/ready to say draining")
        assert requests.get(b.url + "/health", timeout=5).status_code == 200
        refused = chat(b.url, "a")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        finished = slow.result()
    assert finished.status_code == 200 and finished.json()["server"] == "a"  # not cut
    assert b.proc.wait(20) == 0


def test_shutdown_timeout_bounds_the_drain_and_a_second_signal_forces(berth, start_port):
    for extra, signals in (("shutdownTimeout: 1\n", 1), ("", 2)):
        b = berth(f"startPort: {start_port}\n{extra}models:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
        with ThreadPoolExecutor(1) as pool:
            endless = pool.submit(chat, b.url, "a", 60, sleep=40)
            wait_until(lambda: b.running().get("a", {}).get("in_flight") == 1, 10, "the long request")
            for _ in range(signals):
                b.proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)  # the two signals must arrive as two
            assert b.proc.wait(30) == 0  # within shutdownTimeout + the model's unloadTimeout (10 s)
            with pytest.raises(requests.ConnectionError):  # cut, not answered after its 40 s
                endless.result()


def test_ready_waits_for_the_preloads(berth, start_port):
    b = berth(f"startPort: {start_port}\nhooks: {{on_startup: {{preload: [a]}}}}\n"
              f"models:\n  a: {{cmd: \"{fake_cmd('a', '--load-delay', '2')}\"}}\n")
    first = requests.get(b.url + "/ready", timeout=5)
    assert first.status_code == 503 and first.json() == {"status": "preloading", "models": ["a"]}
    wait_until(lambda: requests.get(b.url + "/ready", timeout=5).status_code == 200, 20, "preload")
    assert b.running()["a"]["state"] == "ready"


def test_host_names_berth_is_not_known_by_are_refused_on_localhost(berth, start_port):
    """DNS rebinding: a page on evil.example resolves its name to 127.0.0.1 and calls berth."""
    config = f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n"
    b = berth(config)
    port = b.url.rsplit(":", 1)[1]
    rebound = requests.post(b.url + "/v1/chat/completions", json={"model": "a", "messages": []},
                            headers={"Host": f"evil.example:{port}"}, timeout=10)
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert "allowedHosts" in rebound.json()["error"]["message"]
    assert requests.get(b.url + "/running", headers={"Host": "evil.example"}, timeout=5).status_code == 403
    assert b.running() == {}  # nothing was started for it
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert requests.get(b.url + "/v1/models", headers={"Host": host}, timeout=5).status_code == 200
    named = berth(f"allowedHosts: [berth.lan]\n{config}")
    assert requests.get(named.url + "/v1/models", headers={"Host": "berth.lan:80"}, timeout=5).status_code == 200
    assert requests.get(named.url + "/v1/models", headers={"Host": "evil.example"}, timeout=5).status_code == 403


def test_a_hung_model_is_restarted_and_its_requests_end_with_an_error(berth, start_port):
    b = berth(f"startPort: {start_port}\nmodels:\n  a:\n    healthCheckInterval: 0.3\n    unloadTimeout: 2\n"
              f"    cmd: {fake_cmd('a')}\n")
    assert chat(b.url, "a").status_code == 200
    pid = b.pid_of("a")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, b.url, "a", 60, sleep=3)  # in flight when the model hangs
        wait_until(lambda: b.running()["a"]["in_flight"] == 1, 10, "the request")
        os.kill(pid, signal.SIGSTOP)
        try:
            answer = waiting.result()
            assert answer.status_code in (502, 504) and answer.json()["error"]["type"] == "server_error"
        finally:
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
    wait_until(lambda: b.pid_of("a") != pid, 15, "the hung model to be replaced")
    assert not pid_alive(pid)
    assert chat(b.url, "a").status_code == 200
    assert "missed 3 health checks in a row" in requests.get(b.url + "/logs", timeout=5).text


def test_upstream_timeouts_end_requests_with_a_504(berth, start_port):
    b = berth(f"startPort: {start_port}\ntimeouts: {{idle: 1}}\nmodels:\n"
              f"  a: {{cmd: \"{fake_cmd('a')}\", timeouts: {{responseHeader: 1}}}}\n"
              f"  b: {{cmd: \"{fake_cmd('b')}\"}}\n")
    slow = chat(b.url, "a", sleep=5)
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "upstream_timeout"
    assert "timeouts.responseHeader 1s" in slow.json()["error"]["message"]
    stalled = requests.post(b.url + "/v1/chat/completions", timeout=30, stream=True,
                            json={"model": "b", "messages": [], "stream": True, "chunks": 3, "chunk_delay": 3})
    body = b"".join(stalled.iter_content(None)).decode()
    assert body.startswith("data: ") and "timeouts.idle (1s)" in body  # an error event ends the stream
    assert chat(b.url, "b").status_code == 200 and chat(b.url, "a").status_code == 200  # both still serve


def test_requests_http_cannot_read_get_openai_shaped_errors(berth, start_port):
    import socket

    b = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
    port = int(b.url.rsplit(":", 1)[1])
    broken = (b"NOT HTTP AT ALL\r\n\r\n",
              b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"x" * 20_000 + b"\r\n\r\n",
              b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n")
    for raw in broken:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", head) and b"application/json" in head, answer[:300]
        error = json.loads(body)["error"]
        assert error["code"] == "bad_http_request" and error["type"] == "invalid_request_error"
    assert chat(b.url, "a").status_code == 200


def _slowloris(port: int, count: int) -> list:
    """`count` connections that start a request's headers and never finish them."""
    import socket

    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        held.append(sock)
    return held


def test_slow_clients_are_dropped_and_bodies_must_arrive(berth, start_port):
    import socket

    b = berth(f"startPort: {start_port}\nclientHeaderTimeout: 1\nclientBodyTimeout: 1\n"
              f"models:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
    port = int(b.url.rsplit(":", 1)[1])
    slow = _slowloris(port, 20)
    try:
        assert all(closed_by_server(sock, 10) for sock in slow)  # dropped, not held forever
        with socket.create_connection(("127.0.0.1", port), timeout=10) as trickled:
            trickled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
                             b"Content-Type: application/json\r\n\r\n{\"model\": ")
            answer = trickled.recv(65536)
        assert b" 408 " in answer.split(b"\r\n")[0] and b"clientBodyTimeout" in answer
        assert chat(b.url, "a").status_code == 200  # served as ever
    finally:
        for sock in slow:
            sock.close()


def test_connections_over_max_connections_are_closed_at_once(berth, start_port):
    b = berth(f"startPort: {start_port}\nclientHeaderTimeout: 60\nmaxConnections: 10\n"
              f"models:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
    slow = _slowloris(int(b.url.rsplit(":", 1)[1]), 15)
    try:
        # Watch all of them at once until the refusals are in (however loaded the machine), then a moment
        # longer for any further close; held ones stay open for their 60 s.
        closed: set = set()
        deadline = time.monotonic() + 20
        while len(closed) < 5 and time.monotonic() < deadline:
            readable, _, _ = select.select([s for s in slow if s not in closed], [], [], 0.5)
            closed.update(sock for sock in readable if closed_by_server(sock, 1))
        readable, _, _ = select.select([s for s in slow if s not in closed], [], [], 1)
        closed.update(sock for sock in readable if closed_by_server(sock, 1))
        held = len(slow) - len(closed)
        # ten places: at most ten are held, at least nine (another client may hold one), the rest refused
        assert 9 <= held <= 10
    finally:
        for sock in slow:
            sock.close()

    def served() -> bool:
        # the server may not yet have seen the closes above; until it does, a new connection is refused too
        try:
            return chat(b.url, "a").status_code == 200
        except requests.ConnectionError:
            return False
    wait_until(served, 10, "room for a new connection")


def test_a_reload_that_removes_a_streaming_model_moves_no_other_models_port(berth, start_port):
    """Ports used to follow the order of models in the file: removing `a` gave `b` the port `a` was still
    draining on. Now each start takes a free port, and a draining model keeps its own."""
    both = (f"startPort: {start_port}\nmemory: {{scheduling: false}}\nmodels:\n"
            f"  a: {{cmd: \"{fake_cmd('a')}\"}}\n  b: {{cmd: \"{fake_cmd('b')}\"}}\n")
    only_b = f"startPort: {start_port}\nmodels:\n  b: {{cmd: \"{fake_cmd('b')}\"}}\n"
    b = berth(both)
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(requests.post, b.url + "/v1/chat/completions", timeout=60,
                                json={"model": "a", "messages": [], "stream": True, "chunks": 20, "chunk_delay": 0.2})
        wait_until(lambda: b.running().get("a", {}).get("in_flight") == 1, 10, "a's stream")
        a_port = b.running()["a"]["port"]
        b.config_path.write_text(only_b)
        b.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: chat(b.url, "b").status_code == 200, 20, "b to serve after the reload")
        assert b.running()["b"]["port"] != a_port
        assert streaming.result().text.rstrip().endswith("data: [DONE]")  # a's stream was not cut
    b.config_path.write_text(both)  # and a comes back
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: chat(b.url, "a").status_code == 200, 20, "a to serve again")


def test_clients_of_one_llama_server_and_of_llama_swap_find_their_routes(berth, start_port):
    one = berth(f"startPort: {start_port}\nmodels:\n  org/sub: {{cmd: \"{fake_cmd('a')}\"}}\n")
    # llama-server's own routes without /v1, and its GETs without ?model=: the only model answers
    r = requests.post(one.url + "/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 200 and r.json()["server"] == "a"
    for path in ("/props", "/slots"):
        assert requests.get(one.url + path, timeout=30).status_code == 200, path
    assert requests.get(one.url + "/props", timeout=30).json()["path"] == "/props"
    # /upstream with a slashed id, with and without a path after it
    assert requests.get(one.url + "/upstream/org/sub/health", timeout=30).status_code == 200
    assert requests.get(one.url + "/upstream/org/sub", timeout=30).json()["path"] == "/"  # redirected to .../
    bare = requests.post(one.url + "/upstream/org/sub?x=1", timeout=30, allow_redirects=False)
    assert bare.status_code == 308 and bare.headers["Location"] == "/upstream/org/sub/?x=1"
    missing = requests.get(one.url + "/upstream/nope/health", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    # llama-swap's unload routes (Open WebUI's eject button)
    assert one.running()["org/sub"]["state"] == "ready"
    r = requests.post(one.url + "/api/models/unload/org/sub", timeout=30)
    assert r.status_code == 200 and r.json()["unloaded"] == {"org/sub": "stopped"} and one.running() == {}
    requests.post(one.url + "/chat/completions", json={"messages": []}, timeout=30)
    assert requests.post(one.url + "/api/models/unload", timeout=30).json()["unloaded"] == {"org/sub": "stopped"}
    two = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n"
                f"  b: {{cmd: \"{fake_cmd('b')}\"}}\n")
    ambiguous = requests.get(two.url + "/props", timeout=30)
    assert ambiguous.status_code == 400 and "needs ?model=" in ambiguous.json()["error"]["message"]


def test_llama_swap_defaults_that_mean_use_the_default(tmp_path):
    from berth.config import parse_config

    config = parse_config("globalTTL: 300\nmodels:\n  a: {cmd: 'x --port ${PORT}', ttl: -1, concurrencyLimit: 0}\n"
                          "  b: {cmd: 'y --port ${PORT}', ttl: 0, concurrencyLimit: 3}\n")
    assert (config.models["a"].ttl, config.models["a"].concurrency_limit) == (300, 10)
    assert (config.models["b"].ttl, config.models["b"].concurrency_limit) == (0, 3)


def test_a_matrix_decides_which_models_run_together(berth, start_port):
    b = berth(f"startPort: {start_port}\nmodels:\n"
              + "".join(f"  {m}: {{cmd: \"{fake_cmd(m)}\"}}\n" for m in "abc")
              + "routing:\n  router:\n    use: matrix\n    settings:\n      matrix:\n"
                "        vars: {x: a}\n        evict_costs: {x: 5}\n        sets: {pair: \"x & b\", solo: c}\n")
    for model in "ab":
        assert chat(b.url, model).status_code == 200
    assert set(b.running()) == {"a", "b"}  # [a,b] is a set: they run together
    assert chat(b.url, "c").status_code == 200
    wait_until(lambda: set(b.running()) == {"c"}, 10, "c to run alone")  # c is alone in its set
    assert chat(b.url, "b").status_code == 200
    wait_until(lambda: set(b.running()) == {"b"}, 10, "b to replace c")


def test_send_loading_state_streams_progress_while_the_model_starts(berth, start_port):
    from openai import OpenAI

    b = berth(f"startPort: {start_port}\nsendLoadingState: true\nmodels:\n"
              f"  slow: {{cmd: \"{fake_cmd('slow', '--load-delay', '2.5')}\"}}\n"
              f"  quiet: {{cmd: \"{fake_cmd('quiet', '--load-delay', '1')}\", sendLoadingState: false}}\n")
    client = OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    chunks = iter(stream)
    first = next(chunks)  # arrives at once, while the model still loads
    assert b.running()["slow"]["state"] == "starting"
    reasoning = [first.choices[0].delta.model_extra["reasoning_content"]]
    content = []
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if (delta.model_extra or {}).get("reasoning_content"):
            assert not content, "loading notes come before the answer"
            reasoning.append(delta.model_extra["reasoning_content"])
        elif delta.content:
            content.append(delta.content)
    assert len(reasoning) >= 3 and "loading slow" in reasoning[0] and "slow is ready" in reasoning[-1]
    assert "".join(content) == "tok0 tok1 tok2 tok3 tok4 "  # the model's own stream, whole
    # a ready model, and a model that turns it off: no loading notes
    again = client.chat.completions.create(model="slow", messages=[], stream=True)
    assert not any((c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in again if c.choices)
    quiet = client.chat.completions.create(model="quiet", messages=[], stream=True)
    assert not any((c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in quiet if c.choices)


def test_a_start_that_fails_under_send_loading_state_ends_the_stream_with_the_error(berth, start_port):
    b = berth(f"startPort: {start_port}\nsendLoadingState: true\nmodels:\n"
              f"  broken: {{cmd: \"{fake_cmd('broken', '--exit-at-start', '3')}\"}}\n")
    r = requests.post(b.url + "/v1/chat/completions", timeout=60,
                      json={"model": "broken", "messages": [], "stream": True})
    assert r.status_code == 200  # the stream began before the start failed
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "loading broken" in events[0]["choices"][0]["delta"]["reasoning_content"]
    assert events[-1]["error"]["code"] == "model_start_failed" and "could not load model" in \
        events[-1]["error"]["message"]
    assert r.text.rstrip().endswith("data: [DONE]")


def test_upstream_paths_in_ignore_paths_never_load_a_model(berth, start_port):
    b = berth(f"startPort: {start_port}\nupstream: {{ignorePaths: ['^/ws$']}}\nmodels:\n"
              f"  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
    refused = requests.get(b.url + "/upstream/a/ws", timeout=30)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_not_loaded"
    assert b.running() == {}  # nothing was started
    assert requests.get(b.url + "/upstream/a/health", timeout=30).status_code == 200  # other paths load it
    assert requests.get(b.url + "/upstream/a/ws", timeout=30).json()["path"] == "/ws"  # loaded: passes


def test_v1_models_in_llama_swaps_shape_with_macros_everywhere(berth, start_port):
    b = berth(f"""
startPort: {start_port}
macros: {{temp: 0.7, family: gemma}}
models:
  m:
    cmd: "{fake_cmd('m')}"
    name: "${{family}} model"
    aliases: ["${{MODEL_ID}}-chat"]
    useModelName: "org/${{MODEL_ID}}"
    filters: {{setParams: {{note: "from ${{MODEL_ID}}", temperature: "${{temp}}"}}}}
    capabilities: {{in: [text, image], out: [text], tools: true, context: 32000}}
    metadata:
      port: ${{PORT}}
      temperature: ${{temp}}
      note: "${{MODEL_ID}} on ${{PORT}} at ${{temp}}"
      an_obj: {{c: ["${{temp}}", false, "model: ${{MODEL_ID}}"]}}
""")

    def entry() -> dict:
        (found,) = requests.get(b.url + "/v1/models", timeout=10).json()["data"]
        return found

    cold = entry()
    assert cold["name"] == "gemma model" and cold["status"] == {"value": "unloaded"}
    assert cold["architecture"]["modality"] == "text+image->text" and cold["context_length"] == 32000
    assert cold["capabilities"] == {"vision": True, "function_calling": True}
    assert cold["meta"]["n_ctx"] == 32000
    meta = cold["meta"]["llamaswap"]
    # typed; the port it will try at its start (llama-swap's ${PORT}: it is the only model)
    assert meta["temperature"] == 0.7 and meta["port"] == start_port
    assert meta["note"] == f"m on {start_port} at 0.7"
    assert meta["an_obj"] == {"c": [0.7, False, "model: m"]} and meta["aliases"] == ["m-chat"]
    assert meta["type"] == "model"
    sent = chat(b.url, "m-chat").json()  # the alias, expanded; the fake echoes what it was sent
    assert sent["model"] == "org/m"  # useModelName, expanded
    # setParams with macros, typed as the macro (the fake echoes the body of paths it does not serve)
    echoed = requests.post(b.url + "/v1/embeddings", json={"model": "m", "input": "x"}, timeout=10).json()
    assert json.loads(echoed["body"]) == {"model": "org/m", "input": "x", "note": "from m", "temperature": 0.7}
    warm = entry()
    port = b.running()["m"]["port"]
    assert warm["status"] == {"value": "loaded"} and warm["meta"]["llamaswap"]["port"] == port
    assert warm["meta"]["llamaswap"]["note"] == f"m on {port} at 0.7"


def test_audio_and_image_routes_through_the_openai_sdk(berth, start_port, tmp_path):
    import openai

    b = berth(f"startPort: {start_port}\nmodels:\n"
              f"  whisper: {{cmd: \"{fake_cmd('whisper')}\", useModelName: whisper-large-v3}}\n"
              f"  painter: {{cmd: \"{fake_cmd('painter')}\"}}\n")
    client = openai.OpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
    audio = tmp_path / "hello.wav"
    audio.write_bytes(b"RIFF" + bytes(4000))
    with audio.open("rb") as fh:
        heard = client.audio.transcriptions.with_raw_response.create(model="whisper", file=fh).parse()
    assert heard.text == "whisper heard 4004 bytes"  # the form's `model` chose the server
    assert heard.model_extra["model"] == "whisper-large-v3"  # and was renamed by useModelName
    with audio.open("rb") as fh:
        assert client.audio.translations.create(model="whisper", file=fh).text.startswith("whisper heard")
    image = client.images.generate(model="painter", prompt="a boat")
    assert image.data[0].revised_prompt == "painter: a boat"
    with audio.open("rb") as fh:  # a form naming no model, with several models configured
        with pytest.raises(openai.BadRequestError, match="no `model` field"):
            client.post("/audio/transcriptions", cast_to=object, files=[("file", ("a.wav", fh.read()))],
                        options={"headers": {"Content-Type": "multipart/form-data"}})
    with audio.open("rb") as fh:
        with pytest.raises(openai.NotFoundError):
            client.audio.transcriptions.create(model="nope", file=fh)


def test_set_params_by_id_gives_variants_of_one_loaded_model_without_a_reload(berth, start_port):
    b = berth(f"""
startPort: {start_port}
models:
  m:
    cmd: "{fake_cmd('m')}"
    filters:
      setParams: {{temperature: 0.7}}
      setParamsByID:
        "${{MODEL_ID}}": {{chat_template_kwargs: {{reasoning_effort: medium}}}}
        "${{MODEL_ID}}:high": {{chat_template_kwargs: {{reasoning_effort: high}}, temperature: 1.0}}
""")

    def sent(model: str) -> dict:
        r = requests.post(b.url + "/v1/embeddings", json={"model": model, "input": "x"}, timeout=30)
        assert r.status_code == 200, r.text
        return json.loads(r.json()["body"])

    assert sent("m")["chat_template_kwargs"] == {"reasoning_effort": "medium"} and sent("m")["temperature"] == 0.7
    pid = b.running()["m"]["pid"]
    high = sent("m:high")  # an alias made from the key: the same server, other parameters
    assert high["chat_template_kwargs"] == {"reasoning_effort": "high"} and high["temperature"] == 1.0
    assert b.running()["m"]["pid"] == pid  # no reload
    ids = {m["id"] for m in requests.get(b.url + "/v1/models", timeout=10).json()["data"]}
    assert ids == {"m"}  # listed once, as llama-swap lists aliases (includeAliasesInList shows them)


def test_peers_route_by_qualified_and_unique_ids_and_carry_their_own_key(berth, start_port, fake_openai_peer):
    back = berth(f"startPort: {start_port}\napiKeys: [back-secret]\nmodels:\n  x: {{cmd: \"{fake_cmd('x-on-back')}\"}}\n")
    front = berth(f"""
startPort: {start_port + 4}
apiKeys: [front-key]
models:
  x: {{cmd: "{fake_cmd('x-on-front')}"}}
peers:
  back: {{proxy: "{back.url}", apiKey: back-secret, models: [x, y-only]}}
  hosted:
    proxy: "{fake_openai_peer}/"
    apiKey: hosted-secret
    models: [vendor/big]
    filters: {{stripParams: "temperature", setParams: {{provider: {{zdr: true}}}}}}
  keyless: {{proxy: "{back.url}", models: [x]}}
""")
    auth = {"Authorization": "Bearer front-key"}

    def ask(model: str, path: str = "/v1/chat/completions") -> requests.Response:
        return requests.post(front.url + path, headers=auth, timeout=30,
                             json={"model": model, "messages": [], "temperature": 0.1})

    assert ask("x").json()["server"] == "x-on-front"  # a local id wins over a peer's
    assert ask("back/x").json()["server"] == "x-on-back"  # the qualified id goes to the peer, with its key
    refused = ask("keyless/x")  # a peer without apiKey gets no key: the back berth refuses
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    echoed = ask("vendor/big", "/v1/embeddings").json()  # unqualified, and only `hosted` lists it
    headers = {k.lower(): v for k, v in echoed["headers"].items()}
    assert headers["authorization"] == "Bearer hosted-secret" and headers["x-api-key"] == "hosted-secret"
    assert json.loads(echoed["body"]) == {"model": "vendor/big", "messages": [], "provider": {"zdr": True}}
    assert ask("y-only").status_code == 404  # the peer's own answer: back serves no y-only
    listed = {m["id"]: m for m in requests.get(front.url + "/v1/models", headers=auth, timeout=10).json()["data"]}
    assert {"x", "back/x", "back/y-only", "hosted/vendor/big", "keyless/x"} <= set(listed)
    assert listed["back/x"]["meta"]["llamaswap"] == {"type": "peer", "peerID": "back"}


def test_profiles_pin_names_at_run_time_and_selectors_pick_targets(berth, start_port):
    b = berth(f"""
startPort: {start_port}
models:
  big: {{cmd: "{fake_cmd('big')}"}}
  small: {{cmd: "{fake_cmd('small')}"}}
profiles:
  coding:
    description: code models
    pins: {{llm-code: big, small: ~, llm-any: any-warm}}
selectors:
  any-warm: {{strategy: warm, targets: [big, small], name: Any loaded model}}
  fill: {{strategy: spillover, targets: [small, big], settings: {{spillover: 1}}}}
""")
    assert chat(b.url, "any-warm").json()["server"] == "big"  # none is loaded: the first target
    assert chat(b.url, "small").json()["server"] == "small"
    requests.post(b.url + "/models/unload", json={"model": "big"}, timeout=30)
    wait_until(lambda: "big" not in b.running(), 10, "big to stop")
    assert chat(b.url, "any-warm").json()["server"] == "small"  # the loaded one now
    # profiles: none active at start; PUT switches; a pin renames, a null pin refuses
    listing = requests.get(b.url + "/api/profiles", timeout=10).json()
    assert listing == {"active": None, "profiles": [{"id": "coding", "description": "code models",
                                                     "pins": {"llm-code": "big", "small": None, "llm-any": "any-warm"}}]}
    assert chat(b.url, "llm-code").status_code == 404
    put = requests.put(b.url + "/api/profiles/active", json={"name": "coding"}, timeout=10)
    assert put.json() == {"active": "coding"}
    assert chat(b.url, "llm-code").json()["server"] == "big"
    assert chat(b.url, "llm-any").json()["server"] in ("big", "small")  # a pin to a selector
    off = chat(b.url, "small")
    assert off.status_code == 404 and "turned off by the active profile 'coding'" in off.json()["error"]["message"]
    ids = {m["id"]: m for m in requests.get(b.url + "/v1/models", timeout=10).json()["data"]}
    assert ids["llm-code"]["meta"]["llamaswap"] == {"type": "pin", "profile": "coding", "target": "big"}
    assert ids["any-warm"]["meta"]["llamaswap"]["type"] == "selector"
    unknown = requests.put(b.url + "/api/profiles/active", json={"name": "nope"}, timeout=10)
    assert unknown.status_code == 404 and "profiles: coding" in unknown.json()["error"]["message"]
    assert requests.put(b.url + "/api/profiles/active", json={"name": None}, timeout=10).json() == {"active": None}
    assert chat(b.url, "small").json()["server"] == "small"
    requests.put(b.url + "/api/profiles/active", json={"name": "coding"}, timeout=10)
    b.proc.send_signal(signal.SIGHUP)  # a reload leaves no profile active, as in llama-swap
    wait_until(lambda: requests.get(b.url + "/api/profiles", timeout=10).json()["active"] is None, 10, "the reload")
    # spillover: one request per target, so a second concurrent request goes to the next target
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, b.url, "fill", stream=True, chunks=20, chunk_delay=0.1)
        wait_until(lambda: b.running().get("small", {}).get("in_flight") == 1, 10, "the first on small")
        second = chat(b.url, "fill")
        assert second.json()["server"] == "big"
        assert first.result().status_code == 200


def test_groups_in_the_routing_section_swap_as_llama_swap_documents(berth, start_port):
    b = berth(f"startPort: {start_port}\nmodels:\n"
              + "".join(f"  {m}: {{cmd: \"{fake_cmd(m)}\"}}\n" for m in ("a", "b", "keep"))
              + "routing:\n  router:\n    use: group\n    settings:\n      groups:\n"
                "        chat: {swap: true, exclusive: false, members: [a, b]}\n"
                "        forever: {persistent: true, swap: false, exclusive: false, members: [keep]}\n")
    for model in ("keep", "a"):
        assert chat(b.url, model).status_code == 200
    assert set(b.running()) == {"keep", "a"}
    assert chat(b.url, "b").status_code == 200  # a and b swap; keep is untouched
    wait_until(lambda: set(b.running()) == {"keep", "b"}, 10, "b to replace a")
