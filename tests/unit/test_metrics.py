from berth.gateway.metrics import Metrics


def token_count(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("berth_tokens_total", {"model": "m", "kind": kind}) or 0.0


def test_usage_with_nested_details_is_counted_from_the_last_occurrence():
    metrics = Metrics()
    body = (b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n'
            b'data: {"choices":[],"usage":{"completion_tokens":12,"prompt_tokens":30,'
            b'"prompt_tokens_details":{"cached_tokens":4}},"timings":{"x":1}}\n\ndata: [DONE]\n\n')
    metrics.count_answer("m", body)
    assert token_count(metrics, "prompt") == 30 and token_count(metrics, "completion") == 12


def test_missing_or_cut_usage_counts_nothing():
    metrics = Metrics()
    metrics.count_answer("m", b'{"choices": []}')
    metrics.count_answer("m", b'"usage": {"prompt_tokens": 3, "compl')
    assert token_count(metrics, "prompt") == 0
