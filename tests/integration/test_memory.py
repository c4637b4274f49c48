"""Memory-aware scheduling end to end: a real berth, fake model servers declaring (or really using) memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import fake_cmd, start_log_lines, wait_until

GiB = 1024**3


def chat(url: str, model: str, timeout: float = 30, **extra) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return requests.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def config(start_port: int, tmp_path, models: dict[str, str], budget: str = "10GiB", extra: str = "") -> str:
    """`models`: id -> extra YAML lines for that model (indented by the caller's convention)."""
    log = tmp_path / "starts.log"
    lines = [f"startPort: {start_port}", "healthCheckTimeout: 20",
             f"memory:\n  budget: {{ram: {budget}}}\n  headroom: 0", extra, "models:"]
    for model_id, body in models.items():
        flags = body.split("|", 1)
        keys = flags[0]
        cmd = fake_cmd(model_id, "--start-log", str(log), *(flags[1].split() if len(flags) > 1 else []))
        lines.append(f"  {model_id}:\n    cmd: {cmd}\n" + "".join(f"    {k}\n" for k in keys.split(";") if k))
    return "\n".join(lines)


def samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def declared(gib: int, more: str = "") -> str:
    return f"memory: {{ram: {gib}GiB}}" + (f";{more}" if more else "")


def test_models_that_fit_run_together_and_the_least_recently_used_makes_room(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path, {"a": declared(4), "b": declared(4), "c": declared(6)}))
    assert chat(b.url, "a").status_code == 200
    assert chat(b.url, "b").status_code == 200
    assert set(b.running()) == {"a", "b"}  # 8 of 10 GiB: both stay
    assert chat(b.url, "a").status_code == 200  # a used last: b is now the least recently used
    assert chat(b.url, "c").status_code == 200
    assert set(b.running()) == {"a", "c"}
    running = b.running()
    assert running["c"]["memory"] == {"planned_bytes": {"host": 6 * GiB}, "source": "declared", "detail": "",
                                      "measured_bytes": running["c"]["memory"]["measured_bytes"]}
    devices = requests.get(b.url + "/running", timeout=5).json()["devices"]
    assert devices["host"]["budget_bytes"] == 10 * GiB
    assert devices["host"]["planned_in_use_bytes"] == 10 * GiB


def test_busy_model_finishes_its_request_before_it_is_evicted(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path, {"a": declared(8), "c": declared(6)}))
    assert chat(b.url, "a").status_code == 200
    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(r=chat(b.url, "a", sleep=2)))
    thread.start()
    try:
        wait_until(lambda: b.running()["a"]["in_flight"] == 1, 10, "the slow request to be in flight")
        assert chat(b.url, "c").status_code == 200
    finally:
        thread.join()
    assert slow["r"].status_code == 200 and slow["r"].json()["server"] == "a"  # not cut by the eviction
    assert list(b.running()) == ["c"]


def test_pinned_model_stays_and_a_model_that_cannot_fit_beside_it_gets_507(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path, {"p": declared(6, "persistent: true"), "c": declared(6)}))
    assert chat(b.url, "p").status_code == 200
    r = chat(b.url, "c")
    assert r.status_code == 507
    error = r.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert "needs 6.0 GiB, at most 4.0 GiB can be freed" in error["message"]
    assert "pinned models p" in error["message"]
    assert list(b.running()) == ["p"]


def test_model_larger_than_the_budget_is_refused_before_anything_starts(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path, {"a": declared(2), "huge": declared(12)}))
    assert chat(b.url, "a").status_code == 200
    r = chat(b.url, "huge")
    assert r.status_code == 507
    assert "huge" in r.json()["error"]["message"] and "berth fit" in r.json()["error"]["message"]
    assert [line.split()[0] for line in start_log_lines(tmp_path / "starts.log")] == ["a"]  # huge never ran
    assert list(b.running()) == ["a"]


def test_out_of_memory_start_evicts_idle_models_and_retries_once(berth, start_port, tmp_path):
    marker = tmp_path / "oom-marker"
    b = berth(config(start_port, tmp_path, {"a": declared(2), "b": declared(2) + f"|--oom-once {marker}"}))
    assert chat(b.url, "a").status_code == 200
    r = chat(b.url, "b")
    assert r.status_code == 200 and r.json()["server"] == "b"
    assert marker.exists()  # the first start did fail
    assert [line.split()[0] for line in start_log_lines(tmp_path / "starts.log")] == ["a", "b", "b"]
    assert list(b.running()) == ["b"]  # a was evicted for the retry


def test_measured_usage_becomes_the_plan_and_survives_a_restart(berth, start_port, tmp_path):
    text = config(start_port, tmp_path, {"big": "|--alloc-mib 96", "other": ""})
    b = berth(text)
    models = {m["id"]: m for m in requests.get(b.url + "/v1/models", timeout=5).json()["data"]}
    assert models["big"]["memory"]["source"] == "unknown"  # not llama.cpp, nothing declared
    assert "declare `memory:`" in models["big"]["memory"]["detail"]
    assert chat(b.url, "big").status_code == 200
    wait_until(lambda: "measured_bytes" in b.running()["big"]["memory"], 10, "a measurement")
    memory = b.running()["big"]["memory"]
    assert memory["measured_bytes"]["host"] >= 96 * 1024**2
    assert memory["source"] == "measured" and memory["planned_bytes"] == memory["measured_bytes"]
    metrics = samples(requests.get(b.url + "/metrics", timeout=5).text)
    assert metrics[("berth_model_memory_planned_bytes", (("device", "host"), ("model", "big"),
                                                         ("source", "measured")))] == memory["planned_bytes"]["host"]
    assert metrics[("berth_model_memory_measured_bytes", (("device", "host"), ("model", "big")))] \
        == memory["measured_bytes"]["host"]
    assert metrics[("berth_device_memory_bytes", (("device", "host"), ("kind", "budget")))] == 10 * GiB
    b.stop()
    again = berth(text)
    models = {m["id"]: m for m in requests.get(again.url + "/v1/models", timeout=5).json()["data"]}
    assert models["big"]["memory"]["source"] == "measured"
    assert models["big"]["memory"]["planned_bytes"]["host"] >= 96 * 1024**2
    assert models["other"]["memory"]["source"] == "unknown"


def test_scheduling_off_keeps_llama_swap_swapping(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path, {"a": declared(1), "b": declared(1)},
                     extra="").replace("headroom: 0", "headroom: 0\n  scheduling: false"))
    assert chat(b.url, "a").status_code == 200
    assert chat(b.url, "b").status_code == 200
    assert list(b.running()) == ["b"]


def test_bad_memory_settings_name_the_key_and_the_fix(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"models": {"a": {"cmd": "x --port ${PORT}", "memory": {"ram": "lots"}}}}))
    result = subprocess.run([sys.executable, "-m", "berth.cli", "check", "-c", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "models.a.memory.ram" in result.stderr and "24GiB" in result.stderr


def test_check_prints_each_plan_and_the_budget(tmp_path, gemma_gguf):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
memory: {{budget: {{ram: 8GiB}}, headroom: 1GiB}}
models:
  declared: {{cmd: "python -m http.server ${{PORT}}", memory: {{ram: 4GiB}}}}
  mystery: {{cmd: "python -m http.server ${{PORT}}"}}
  gemma: {{cmd: "llama-server -m {gemma_gguf} --port ${{PORT}} -c 2048"}}
""")
    result = subprocess.run([sys.executable, "-m", "berth.cli", "check", "-c", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "memory:  host 4.0 GiB (declared)" in result.stdout
    assert "memory:  unknown (unknown: not a llama.cpp server" in result.stdout
    assert "(estimated: from the GGUF header and its flags)" in result.stdout
    assert "budget:  host 7.0 GiB" in result.stdout


def test_gpu_buffers_from_the_load_log_are_measured_when_nvml_sees_none(berth, start_port, tmp_path):
    text = config(start_port, tmp_path, {"gpu": "|--gpu-log-mib 512"}, budget="10GiB, gpu0: 4GiB")
    b = berth(text)
    assert chat(b.url, "gpu").status_code == 200
    wait_until(lambda: "measured_bytes" in b.running()["gpu"]["memory"], 10, "a measurement")
    memory = b.running()["gpu"]["memory"]
    assert memory["measured_bytes"]["gpu0"] == 512 * 1024**2
    assert memory["planned_bytes"]["gpu0"] == 512 * 1024**2


def test_a_kill_during_a_start_is_not_taken_for_out_of_memory(berth, start_port, tmp_path):
    """kill -9 of a starting model: no evidence of the OOM killer, so nothing else is evicted for a retry."""
    b = berth(config(start_port, tmp_path, {"a": declared(2), "b": declared(2), "slow": declared(2) + "|--load-delay 30"}))
    for model in ("a", "b"):
        assert chat(b.url, model).status_code == 200
    pids = {m: b.pid_of(m) for m in ("a", "b")}
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(chat, b.url, "slow")
        wait_until(lambda: b.running().get("slow", {}).get("pid") is not None, 10, "slow to be spawned")
        os.kill(b.pid_of("slow"), signal.SIGKILL)
        r = loading.result()
    assert r.status_code == 503 and "failed to start" in r.json()["error"]["message"]
    assert {m: b.pid_of(m) for m in ("a", "b")} == pids  # not evicted, not restarted
    assert "slow" not in b.running()  # and no retry under way


def test_a_model_that_keeps_failing_to_start_backs_off_visibly(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path, {"a": declared(2), "broken": declared(2) + "|--exit-at-start 3"}))
    assert chat(b.url, "a").status_code == 200
    first, second = chat(b.url, "broken"), chat(b.url, "broken")
    assert first.json()["error"]["code"] == second.json()["error"]["code"] == "model_start_failed"
    third = chat(b.url, "broken")
    assert third.status_code == 503 and third.json()["error"]["code"] == "model_start_backoff"
    assert int(third.headers["Retry-After"]) >= 1 and "failed to start 2 times" in third.json()["error"]["message"]
    starts = [line.split()[0] for line in start_log_lines(tmp_path / "starts.log")]
    assert starts.count("broken") == 2  # the third request started nothing
    entry = b.running()["broken"]
    assert entry["state"] == "failed" and entry["start_failures"] == 2 and entry["retry_in_s"] > 0
    metrics = samples(requests.get(b.url + "/metrics", timeout=5).text)
    assert metrics[("berth_model_start_backoff_seconds", (("model", "broken"),))] > 0
    assert b.pid_of("a") is not None  # the healthy model was never disturbed
