"""Prometheus metrics for one gateway (a registry of its own, so tests can run several)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from berth.runtime.snapshot import ModelSnapshot
from berth.scheduler import ModelState

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_USAGE_KEY = re.compile(r'"usage"\s*:\s*\{')
_TIMINGS_KEY = re.compile(r'"timings"\s*:\s*\{')
_DECODER = json.JSONDecoder()


class Metrics:
    """Every series the gateway exports, declared by what it describes; the order of the declarations is the
    order of /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._declare_request_series(self.registry)
        self._declare_model_lifecycle_series(self.registry)
        self._declare_upstream_report_series(self.registry)
        self._declare_load_series(self.registry)
        self._declare_key_series(self.registry)
        self._declare_memory_series(self.registry)

    def _declare_request_series(self, r: CollectorRegistry) -> None:
        """Each request to a model: its outcome and how long it took."""
        self.requests = Counter("berth_requests", "Requests by model and HTTP status", ["model", "status"], registry=r)
        self.latency = Histogram("berth_request_duration_seconds", "Request duration, first byte in to last byte out",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("berth_time_to_first_byte_seconds", "Time from request to the first upstream byte",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)

    def _declare_model_lifecycle_series(self, r: CollectorRegistry) -> None:
        """Model processes starting, failing, crashing and being swapped out, and who waits meanwhile."""
        self.load_seconds = Histogram("berth_model_load_duration_seconds", "Time from spawn to ready", ["model"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.swaps = Counter("berth_swaps", "Models stopped to make room for another", registry=r)
        self.start_failures = Counter("berth_model_start_failures", "Starts that never became ready", ["model"],
                                      registry=r)
        self.crashes = Counter("berth_model_crashes", "Model processes that exited while ready", ["model"], registry=r)
        self.model_state = Gauge("berth_model_state", "1 for the state each model is in", ["model", "state"],
                                 registry=r)
        self.queue_depth = Gauge("berth_queue_depth", "Requests waiting for a model", registry=r)
        self.start_backoff = Gauge("berth_model_start_backoff_seconds",
                                   "Seconds before a model that failed to start repeatedly is tried again",
                                   ["model"], registry=r)

    def _declare_upstream_report_series(self, r: CollectorRegistry) -> None:
        """What model servers report (tokens in `usage`, cached tokens in `timings`) and their saved KV slots."""
        self.tokens = Counter("berth_tokens", "Tokens reported by upstream usage", ["model", "kind"], registry=r)
        self.kv_saves = Counter("berth_kv_slot_saves", "KV slot saves before planned stops", ["model", "outcome"],
                                registry=r)
        self.kv_restores = Counter("berth_kv_slot_restores", "KV slot restores after starts", ["model", "outcome"],
                                   registry=r)
        self.kv_bytes = Counter("berth_kv_slot_bytes", "Bytes of KV slots saved and restored", ["model", "direction"],
                                registry=r)
        self.kv_restore_hits = Counter("berth_kv_restore_hit_tokens",
                                       "Cached tokens reused by the first request after a restore", ["model"],
                                       registry=r)

    def _declare_load_series(self, r: CollectorRegistry) -> None:
        """What a load-aware router reads (Kubernetes' Gateway API Inference Extension endpoint picker among them,
        README "Scale out"): totals without labels, since such a picker reads one series per metric, and the
        same per model."""
        self.requests_running = Gauge("berth_requests_running", "Requests at a model server now", registry=r)
        self.kv_cache_usage = Gauge("berth_kv_cache_usage_ratio",
                                    "Share of the loaded models' context slots' tokens in use (0-1)", registry=r)
        self.model_requests_waiting = Gauge("berth_model_requests_waiting", "Requests waiting for one model",
                                            ["model"], registry=r)
        self.model_requests_running = Gauge("berth_model_requests_running", "Requests at one model's server now",
                                            ["model"], registry=r)
        self.model_kv_cache_usage = Gauge("berth_model_kv_cache_usage_ratio",
                                          "Share of one model's context slots' tokens in use (0-1)", ["model"],
                                          registry=r)
        # vLLM's `lora_requests_info` shape, which the endpoint picker's affinity scorer reads: here the
        # "adapters" are whole models, so a picker sends a request to a berth that has its model loaded.
        self.models_info = Gauge("berth_models_info", "Loaded and starting models; the value is when it was set",
                                 ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)

    def _declare_key_series(self, r: CollectorRegistry) -> None:
        """Per API key (its name from the config, never the key): what /api/usage keeps across restarts."""
        self.key_requests = Counter("berth_key_requests", "Requests to models per API key and model",
                                    ["key", "model"], registry=r)
        self.key_errors = Counter("berth_key_errors", "Requests per API key and model answered with an error",
                                  ["key", "model"], registry=r)
        self.key_tokens = Counter("berth_key_tokens", "Tokens per API key and model from the upstream's usage",
                                  ["key", "model", "kind"], registry=r)
        self.key_in_flight = Gauge("berth_key_requests_in_flight", "Requests of an API key in flight or waiting",
                                   ["key"], registry=r)
        self.key_refusals = Counter("berth_key_refusals", "Requests refused by an API key's models, scopes or limits",
                                    ["key", "reason"], registry=r)

    def _declare_memory_series(self, r: CollectorRegistry) -> None:
        """Memory per model (planned by the scheduler, measured while running) and per device."""
        self.memory_planned = Gauge("berth_model_memory_planned_bytes", "Memory the scheduler counts per model",
                                    ["model", "device", "source"], registry=r)
        self.memory_measured = Gauge("berth_model_memory_measured_bytes", "Peak memory a running model used",
                                     ["model", "device"], registry=r)
        self.device_memory = Gauge("berth_device_memory_bytes", "Memory per device: total, free, budget, planned",
                                   ["device", "kind"], registry=r)

    def set_states(self, states: Mapping[str, ModelState]) -> None:
        for model, current in states.items():
            for state in ModelState:
                self.model_state.labels(model, state.value).set(1 if state is current else 0)

    def set_backoff(self, seconds: Mapping[str, float]) -> None:
        for model, left in seconds.items():
            self.start_backoff.labels(model).set(left)

    def set_memory(self, planned: Mapping[str, tuple[str, dict[str, int]]], measured: dict[str, dict[str, int]],
                   devices: dict[str, dict[str, int]]) -> None:
        """Replace the memory gauges with the current figures (models come and go)."""
        for gauge in (self.memory_planned, self.memory_measured, self.device_memory):
            gauge.clear()
        for model, (source, usage) in planned.items():
            for device, amount in usage.items():
                self.memory_planned.labels(model, device, source).set(amount)
        for model, usage in measured.items():
            for device, amount in usage.items():
                self.memory_measured.labels(model, device).set(amount)
        for device, figures in devices.items():
            for kind, amount in figures.items():
                self.device_memory.labels(device, kind.removesuffix("_bytes")).set(amount)

    def set_load(self, models: Mapping[str, ModelSnapshot]) -> None:
        """Replace the load gauges: every configured model's snapshot, taken with its gauges (KV cache use
        is counted for model servers that reported it)."""
        for gauge in (self.model_requests_waiting, self.model_requests_running, self.model_kv_cache_usage,
                      self.models_info):
            gauge.clear()
        for model, snapshot in models.items():
            self.model_requests_waiting.labels(model).set(snapshot.queued)
            self.model_requests_running.labels(model).set(snapshot.in_flight)
        self.requests_running.set(sum(s.in_flight for s in models.values()))
        kv = {model: s.kv for model, s in models.items() if s.kv is not None}
        for model, use in kv.items():
            self.model_kv_cache_usage.labels(model).set(use.used / use.capacity if use.capacity else 0.0)
        capacity = sum(use.capacity for use in kv.values())
        self.kv_cache_usage.set(sum(use.used for use in kv.values()) / capacity if capacity else 0.0)
        loaded = sorted(m for m, s in models.items() if s.state is ModelState.READY)
        starting = sorted(m for m, s in models.items() if s.state is ModelState.STARTING or
                          (s.queued and s.state is not ModelState.READY))
        self.models_info.labels(",".join(loaded), ",".join(starting), str(len(models))).set(time.time())

    def count_answer(self, model: str, tail: bytes, restore_hit: bool = False) -> tuple[int | None, int | None]:
        """(prompt, completion) tokens the end of an answer (`tail`) reports, counted per model: from its last
        `usage` object, or when that has neither, from llama.cpp's `timings` (a stream without include_usage,
        its own /completion: the prompt is what it evaluated plus what it reused from the cache). With
        `restore_hit`, the first answer after a KV slot restore, also the cached tokens it reused (`cache_n`)."""
        text = tail.decode("utf-8", errors="replace")
        usage = last_object(text, _USAGE_KEY)
        for kind in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens"):
            value = usage.get(kind)
            if isinstance(value, int) and value > 0:
                self.tokens.labels(model, kind.replace("_tokens", "")).inc(value)
        prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
        completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
        from_timings = prompt is None and completion is None
        timings = last_object(text, _TIMINGS_KEY) if from_timings or restore_hit else {}
        if from_timings:
            evaluated, cached, completion = (_count(timings.get(k)) for k in ("prompt_n", "cache_n", "predicted_n"))
            if evaluated is not None:
                prompt = evaluated + (cached or 0)
            for kind, value in (("prompt", prompt), ("completion", completion)):
                if value:
                    self.tokens.labels(model, kind).inc(value)
        reused = timings.get("cache_n")
        if restore_hit and isinstance(reused, int) and reused > 0:
            self.kv_restore_hits.labels(model).inc(reused)
        return prompt, completion

    def count_key_usage(self, key: str, model: str, error: bool, prompt_tokens: int, completion_tokens: int) -> None:
        self.key_requests.labels(key, model).inc()
        if error:
            self.key_errors.labels(key, model).inc()
        for kind, value in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if value:
                self.key_tokens.labels(key, model, kind).inc(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def last_object(text: str, key: re.Pattern[str]) -> dict[str, Any]:
    """The last JSON object written under `key` in a response's tail ({} if none or cut off).

    Decoded rather than matched with a regex: such objects nest (`prompt_tokens_details`).
    """
    starts = [m.end() - 1 for m in key.finditer(text)]
    if not starts:
        return {}
    try:
        found, _ = _DECODER.raw_decode(text, starts[-1])
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
