"""The request ledger: each request counted once, refused ones listed but not in the per-model series."""

from berth.gateway.ledger import Outcome, RequestLedger
from berth.gateway.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_an_answer_is_counted_once_with_its_tokens_and_status():
    ledger = RequestLedger(Metrics(), keep=10)
    record = ledger.begin("m", "/v1/chat/completions")
    ledger.sent(record)
    ledger.first_byte(record, 200)
    ledger.read_usage(record, b'data: {"usage": {"prompt_tokens": 30, "completion_tokens": 12}}\n\ndata: [DONE]\n\n',
                      restore_hit=False)
    ledger.end(record, Outcome.ANSWERED)
    ledger.end(record, Outcome.FAILED)  # a second end changes nothing
    metrics = ledger.metrics
    assert sample(metrics, "berth_requests_total", model="m", status="200") == 1
    assert sample(metrics, "berth_request_duration_seconds_count", model="m") == 1
    assert sample(metrics, "berth_time_to_first_byte_seconds_count", model="m") == 1
    assert sample(metrics, "berth_tokens_total", model="m", kind="prompt") == 30
    assert record.outcome is Outcome.ANSWERED and record.first_byte is not None
    [listed] = ledger.recent()
    assert (listed["model"], listed["path"], listed["status"]) == ("m", "/v1/chat/completions", 200)
    assert (listed["prompt_tokens"], listed["completion_tokens"]) == (30, 12)


def test_a_refused_request_is_listed_but_not_counted_as_an_answer():
    ledger = RequestLedger(Metrics(), keep=10)
    ledger.refused(ledger.begin("m", "/v1/completions"), 429)
    assert sample(ledger.metrics, "berth_requests_total", model="m", status="429") == 0
    [listed] = ledger.recent()
    assert listed["status"] == 429 and listed["prompt_tokens"] is None


def test_the_first_answer_after_a_restore_counts_the_reused_tokens():
    ledger = RequestLedger(Metrics(), keep=10)
    record = ledger.begin("m", "/v1/chat/completions")
    ledger.read_usage(record, b'{"usage": {"prompt_tokens": 50}, "timings": {"cache_n": 40}}', restore_hit=True)
    assert sample(ledger.metrics, "berth_kv_restore_hit_tokens_total", model="m") == 40


def test_the_newest_requests_are_kept_newest_first():
    ledger = RequestLedger(Metrics(), keep=3)
    for number in range(5):
        ledger.refused(ledger.begin(f"m{number}", "/v1/completions"), 503)
    assert [r["model"] for r in ledger.recent()] == ["m4", "m3", "m2"]


def test_tokens_come_from_llama_cpps_timings_when_the_answer_has_no_usage():
    ledger = RequestLedger(Metrics(), keep=10)
    record = ledger.begin("m", "/v1/chat/completions", "alice")
    ledger.read_usage(record, b'data: {"choices":[],"timings":{"prompt_n":5,"cache_n":20,"predicted_n":7}}\n\n'
                              b"data: [DONE]\n\n", restore_hit=False)
    assert (record.prompt_tokens, record.completion_tokens) == (25, 7)  # evaluated + reused from the cache
    assert sample(ledger.metrics, "berth_tokens_total", model="m", kind="completion") == 7


def test_every_end_reaches_the_key_accounts_once_with_the_keys_name():
    ended = []
    ledger = RequestLedger(Metrics(), keep=10, on_end=ended.append)
    gone = ledger.begin("m", "/v1/completions", "alice")
    ledger.abandon(gone)
    ledger.end(gone, Outcome.ANSWERED)  # counted already
    assert ended == [gone] and gone.status == 499 and gone.outcome is Outcome.CLIENT_GONE
    assert ledger.recent()[0]["key"] == "alice"
    assert sample(ledger.metrics, "berth_requests_total", model="m", status="499") == 0  # no model server was asked


def test_requests_in_flight_are_listed_first_and_only_a_relaying_one_can_be_cancelled():
    ledger = RequestLedger(Metrics(), keep=10)
    done = ledger.begin("m", "/v1/completions")
    ledger.end(done, Outcome.ANSWERED)
    waiting = ledger.begin("m", "/v1/chat/completions")
    assert [(q["id"], q["in_flight"], q["cancellable"]) for q in ledger.recent()] == [
        (waiting.id, True, False), (done.id, False, False)]
    assert ledger.cancel(waiting.id) is None and ledger.cancel(done.id) is None
    stopped: list[int] = []
    waiting.cancel = lambda: stopped.append(waiting.id)  # what the proxy leaves while it relays
    assert ledger.recent()[0]["cancellable"] is True
    assert ledger.cancel(waiting.id) is waiting and stopped == [waiting.id]
    ledger.end(waiting, Outcome.CANCELLED)
    assert waiting.cancel is None and ledger.find(waiting.id) is waiting
    assert ledger.recent()[0]["outcome"] == "cancelled" and ledger.find(999) is None


def test_bodies_are_kept_only_when_asked_for_and_only_for_the_newest_requests():
    from berth.gateway import capture

    ledger = RequestLedger(Metrics(), keep=1000)
    off = ledger.begin("m", "/v1/chat/completions")
    ledger.capture_request(off, b'{"model": "m"}', "application/json")
    assert off.request_body is None
    ledger.configure(1000, False, capture_bodies=True)
    records = []
    for _ in range(capture.KEEP + 1):
        record = ledger.begin("m", "/v1/chat/completions")
        ledger.capture_request(record, b'{"model": "m", "password": "hunter2"}', "application/json")
        ledger.end(record, Outcome.ANSWERED)
        records.append(record)
    assert records[0].request_body is None  # fell out of the newest KEEP
    assert '"password": "[redacted]"' in (records[-1].request_body or "") and "hunter2" not in records[-1].request_body


def test_redaction_keeps_ordinary_fields_and_replaces_secrets_and_inline_data():
    from berth.gateway.capture import redact, request_text, response_text

    sent = {"max_tokens": 5, "api_key": "sk-1", "headers": {"Authorization": "Bearer x"}, "token": "t",
            "messages": [{"content": [{"image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    assert redact(sent) == {"max_tokens": 5, "api_key": "[redacted]", "headers": {"Authorization": "[redacted]"},
                            "token": "[redacted]",
                            "messages": [{"content": [{"image_url": {"url": "data:image/png;base64,[3 bytes]"}}]}]}
    assert request_text(b"\x00binary", "multipart/form-data") == "(7 bytes of multipart/form-data, not kept)"
    assert response_text(b"data: {}\n\n", 100).endswith("(100 bytes in all)")
