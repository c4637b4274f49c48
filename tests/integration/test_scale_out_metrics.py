"""The load metrics a router in front of several berths reads (README "Scale out": Kubernetes' Gateway API
Inference Extension endpoint picker), against fake model servers that report llama-server's `/slots`."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.deploy import pod_spec, render
from tests.support.fake_model_server import SLOT_CONTEXT
from tests.support.harness import fake_cmd, free_port, wait_until


def samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of berth's /metrics as {(name, sorted labels): value}."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def models_info(found: dict) -> dict[str, str]:
    series = [dict(labels) for (name, labels) in found if name == "berth_models_info"]
    assert len(series) == 1, series  # one series: the picker reads the newest
    return series[0]


def test_waiting_running_kv_use_and_loaded_models_per_model_and_in_total(berth, start_port):
    b = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a', '--parallel', '2')}\"}}\n"
              f"  b: {{cmd: \"{fake_cmd('b', '--load-delay', '3')}\"}}\n"  # b's request waits while b loads
              # together whatever the memory ledger knows: a first run's size is unknown, and such a model
              # would run alone (b's start would stop a)
              "groups: {both: {swap: false, exclusive: false, members: [a, b]}}\n")
    idle = samples(b.url)
    assert value(idle, "berth_requests_running") == 0
    assert value(idle, "berth_kv_cache_usage_ratio") == 0
    assert models_info(idle) == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "2"}
    prompt = "one two three four five six seven"  # the fake counts a token per word
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(requests.post, b.url + "/v1/chat/completions", timeout=60, json={
            "model": "a", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "chunks": 60, "chunk_delay": 0.1})
        wait_until(lambda: (value(samples(b.url), "berth_model_kv_cache_usage_ratio", model="a") or 0) > 0, 10,
                   "a's slots to show its stream")
        waiting = pool.submit(requests.post, b.url + "/v1/chat/completions", timeout=60,
                              json={"model": "b", "messages": []})
        wait_until(lambda: value(samples(b.url), "berth_model_requests_waiting", model="b") == 1, 10,
                   "b's request to wait for b")
        busy = samples(b.url)
        assert value(busy, "berth_model_requests_running", model="a") == 1
        assert value(busy, "berth_model_requests_running", model="b") == 0
        assert value(busy, "berth_requests_running") == 1
        assert value(busy, "berth_queue_depth") == 1
        # a's two slots hold 2 x 1024 tokens; its one stream holds the 7 prompt tokens and what it decoded
        ratio = value(busy, "berth_model_kv_cache_usage_ratio", model="a")
        decoded = ratio * 2 * SLOT_CONTEXT - 7
        assert 1 <= round(decoded) <= 60 and abs(decoded - round(decoded)) < 1e-6
        assert value(busy, "berth_kv_cache_usage_ratio") == ratio  # b is not loaded: it has no slots yet
        assert value(busy, "berth_model_kv_cache_usage_ratio", model="b") is None
        info = models_info(busy)
        assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("a", "b")
        assert stream.result().status_code == 200
        assert waiting.result().status_code == 200
    # the client may read the last byte a moment before berth and the fake server finish the request
    wait_until(lambda: value(samples(b.url), "berth_model_kv_cache_usage_ratio", model="a") == 0 and
               value(samples(b.url), "berth_requests_running") == 0, 30, "the requests to end")
    after = samples(b.url)
    assert value(after, "berth_model_kv_cache_usage_ratio", model="b") == 0
    assert models_info(after)["running_lora_adapters"] == "a,b"  # one group that does not swap: both stay


def test_a_metrics_socket_answers_scrapers_without_the_api_key_and_nothing_else(berth, start_port):
    metrics_port = free_port()
    b = berth(f"startPort: {start_port}\napiKeys: [sekrit]\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n",
              "--metrics-listen", f"127.0.0.1:{metrics_port}")
    side = f"http://127.0.0.1:{metrics_port}"
    assert requests.get(b.url + "/metrics", timeout=10).status_code == 401
    assert requests.get(b.url + "/metrics", timeout=10, headers={"Authorization": "Bearer sekrit"}).ok
    scraped = requests.get(side + "/metrics", timeout=10)
    assert scraped.status_code == 200 and "berth_requests_running 0.0" in scraped.text
    for path in ("/health", "/ready"):
        assert requests.get(side + path, timeout=10).status_code == 200
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/running")):
        refused = requests.request(method, side + path, timeout=10, json={"model": "a", "messages": []})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found", path


def test_metrics_listen_on_the_main_port_is_refused(tmp_path):
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "berth.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--metrics-listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "give it a port of its own" in result.stderr


def test_the_endpoint_pickers_flags_name_gauges_berth_exports(berth, start_port):
    """deploy/kubernetes/scale-out points the picker at berth's names; each must exist, as a gauge."""
    picker = pod_spec(render("scale-out"), "berth-endpoint-picker")["containers"][0]
    named = {flag: value for flag, _, value in (a.removeprefix("--").partition("=") for a in picker["args"])
             if flag.endswith("-metric") and value}
    assert set(named) == {"total-queued-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric"}
    b = berth(f"startPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
    assert requests.post(b.url + "/v1/chat/completions", json={"model": "a", "messages": []}, timeout=30).ok
    text = requests.get(b.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for flag, name in named.items():
        assert name in families and families[name].type == "gauge", flag
    (info,) = families[named["lora-info-metric"]].samples
    assert info.labels["running_lora_adapters"] == "a" and info.value > 1.7e9  # a timestamp: the newest wins
