"""`berth bench`'s pure parts: the request list, the names a /v1/models answer serves, and the summary
and comparison built from request records."""

from __future__ import annotations

import pytest

from berth.bench.report import busy_seconds, compare, removed_by_kind, summarize
from berth.bench.runner import BenchSettings, RequestRecord, listed_names, planned_requests, request_body


def record(target: str, round_: int, index: int, started: float, e2e: float, ttft: float | None = 0.01,
           tokens: int = 10, error: str | None = None, retries: int = 0) -> RequestRecord:
    return RequestRecord("m", 1, "warm", ok=error is None, error=error, started=started, e2e_s=e2e, ttft_s=ttft,
                         itl_s=[0.001] * (tokens - 1) if error is None else [], output_tokens=tokens if error is None
                         else 0, target=target, round=round_, index=index, retries=retries)


def test_the_request_list_takes_the_prompts_in_turn_and_one_place_builds_each_body():
    settings = BenchSettings("http://x", ["a", "b"], 5, [1], ["p0", "p1"], 16, scenario="swap")
    planned = planned_requests(settings)
    assert [(p.index, p.prompt_index, p.prompt) for p in planned] == [
        (i, i % 2, f"p{i % 2}") for i in range(10)]  # swap: the list covers every model
    body = request_body(settings, "served-name", planned[3])
    assert body["model"] == "served-name" and body["messages"] == [{"role": "user", "content": "p1"}]
    assert body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 16


def test_total_requests_counts_every_target_and_round():
    settings = BenchSettings("http://a", ["m"], 4, [1, 8], ["p"], 8, compare_url="http://b", rounds=3)
    assert [t.label for t in settings.targets()] == ["A", "B"]
    assert settings.total_requests() == 4 * 2 * 3 * 2
    assert settings.targets()[1].models == ("m",)  # B is sent the same names unless told otherwise
    named = BenchSettings("http://a", ["m"], 4, [1], ["p"], 8, compare_url="http://b", compare_models=["other"])
    assert named.targets()[1].models == ("other",)


def test_listed_names_take_ids_and_the_aliases_berth_llama_swap_and_llama_server_list():
    berth = {"data": [{"id": "smollm2-135m", "meta": {"llamaswap": {"type": "model", "aliases": ["default"]}}},
                      {"id": "chat", "alias_of": "qwen", "meta": {"llamaswap": {"type": "alias", "modelID": "qwen"}}}]}
    llama_server = {"models": [{"name": "/m.gguf"}], "data": [{"id": "/m.gguf", "aliases": ["tiny", "t"]}]}
    assert listed_names(berth) == {"smollm2-135m", "default", "chat"}
    assert listed_names(llama_server) == {"/m.gguf", "tiny", "t"}
    assert listed_names({"data": [{"id": 3}, "junk", {"meta": {"llamaswap": {"aliases": "not-a-list"}}}]}) == set()
    assert listed_names({}) == set()


def test_busy_seconds_is_the_union_of_the_requests_in_flight():
    records = [record("A", 0, 0, 0.0, 1.0), record("A", 0, 1, 0.5, 1.0), record("A", 0, 2, 3.0, 0.5)]
    assert busy_seconds(records) == pytest.approx(2.0)  # [0, 1.5] and [3, 3.5]
    assert busy_seconds([]) == 0


def test_errors_name_the_requests_they_removed_and_retries_are_counted_apart():
    records = [record("A", 0, 0, 0, 1), record("A", 0, 1, 1, 1, error="http_500"),
               record("A", 1, 1, 2, 1, error="http_500"), record("A", 1, 0, 3, 1, error="timeout", retries=2)]
    assert removed_by_kind(records) == {"http_500": [[0, 1], [1, 1]], "timeout": [[1, 0]]}
    [row] = summarize(records)
    assert row["errors"] == {"http_500": 2, "timeout": 1} and row["succeeded"] == 1 and row["retries"] == 2


def test_compare_pairs_requests_by_place_and_gives_ratios_per_round_with_their_spread():
    records = []
    for round_, slower in ((0, 1.5), (1, 2.0)):  # B is 1.5 then 2 times slower to its first token
        for index in range(3):
            at = round_ * 10 + index
            records.append(record("A", round_, index, at, 1.0, ttft=0.01))
            records.append(record("B", round_, index, at + 5, 1.0, ttft=0.01 * slower))
    records.append(record("B", 1, 3, 30, 1.0, error="upstream_error"))  # only B tried it: removed, not paired
    records.append(record("A", 1, 3, 20, 1.0, ttft=5.0))
    [row] = compare(records)
    assert row["pairs"] == 6 and row["requests"] == {"A": 7, "B": 7}
    assert row["removed"] == {"A": {}, "B": {"upstream_error": [[1, 3]]}}
    ttft = row["ratio"]["ttft_p50"]
    assert ttft["rounds"] == pytest.approx([1.5, 2.0])
    assert (ttft["min"], ttft["median"], ttft["max"]) == pytest.approx((1.5, 1.75, 2.0))
    assert row["ratio"]["output_tokens_per_s"]["rounds"] == pytest.approx([1.0, 1.0])  # same tokens, same time
    assert row["A"]["ttft_p50"] == pytest.approx(0.01)  # A's unpaired 5 s request is not compared
