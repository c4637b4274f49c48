"""The request ledger: each request berth serves is counted once, by one object the handlers and the proxy share.

A handler opens a record when it takes a request for a model (`begin`); the proxy stamps it when it sends
the request on (`sent`), when the status line comes back (`first_byte`) and with the tokens the answer
reported (`read_usage`); whoever finishes it calls `end` once, which updates the Prometheus series, the
recent list the dashboard shows and the request log line. A request refused before any model server was
asked (a full queue, a failed start) is kept in the recent list only, as it always was: the per-model
series count answers from model servers.

A record that came with an API key carries the key's name; when it ends, the ledger hands it to
`on_end` (the key accounts: limits and usage per key). Every record begun is ended once, whatever happens:
`abandon` is for a client that left before its request was sent.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from berth.gateway.metrics import TIMINGS_KEY, Metrics, last_object

log = logging.getLogger("berth.requests")


class Outcome(enum.Enum):
    ANSWERED = "answered"  # the model server's answer (whatever its status) went to the client
    REFUSED = "refused"  # berth answered itself before a model server was asked (queue full, start failed, ...)
    CLIENT_GONE = "client_gone"  # the client left before the answer ended (status 499)
    FAILED = "failed"  # the model server was unreachable, too slow or broke off (berth's 502 or 504)


@dataclass
class RequestRecord:
    """One request, from the moment berth took it to its last byte. Times are `time.perf_counter()`
    readings, except `began_at` (the wall clock at `began`)."""

    model: str  # the id it was counted under (a peer's model as peer/model)
    path: str
    began: float
    began_at: float
    key: str | None = None  # the name of the API key it came with (None: berth has no keys)
    sent: float | None = None  # when it left for a model server (after any wait for a lease)
    first_byte: float | None = None  # when the model server's status line arrived
    ended: float | None = None
    status: int = 502  # until a model server answers, a failure to reach it is berth's 502
    outcome: Outcome | None = None
    prompt_tokens: int | None = None  # from the answer's `usage`
    completion_tokens: int | None = None

    @property
    def duration(self) -> float:
        """Seconds from sending (or, if it was never sent, from taking it) to its end."""
        end = self.ended if self.ended is not None else time.perf_counter()
        return end - (self.sent if self.sent is not None else self.began)

    def as_json(self) -> dict[str, object]:
        """The shape of `/api/requests` entries."""
        return {"at": self.began_at + ((self.ended or self.began) - self.began), "model": self.model,
                "path": self.path, "key": self.key, "status": self.status, "duration_s": round(self.duration, 4),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class RequestLedger:
    def __init__(self, metrics: Metrics, keep: int, log_requests: bool = False,
                 on_end: Callable[[RequestRecord], None] | None = None) -> None:
        self.metrics = metrics
        self._recent: deque[RequestRecord] = deque(maxlen=keep)
        self._log_requests = log_requests
        self._on_end = on_end

    def configure(self, keep: int, log_requests: bool) -> None:
        """Keep the newest `keep` requests (llama-swap's metricsMaxInMemory); log a line for each request
        when `log_requests` (its logRequests)."""
        if keep != self._recent.maxlen:
            self._recent = deque(self._recent, maxlen=keep)
        self._log_requests = log_requests

    def begin(self, model: str, path: str, key: str | None = None) -> RequestRecord:
        return RequestRecord(model, path, time.perf_counter(), time.time(), key)

    def sent(self, record: RequestRecord) -> None:
        record.sent = time.perf_counter()

    def first_byte(self, record: RequestRecord, status: int) -> None:
        record.first_byte = time.perf_counter()
        record.status = status
        sent = record.sent if record.sent is not None else record.began
        self.metrics.ttfb.labels(record.model).observe(record.first_byte - sent)

    def read_usage(self, record: RequestRecord, tail: bytes, restore_hit: bool) -> None:
        """Tokens from the end of an answer (`tail`): counted per model, and kept on the record. With
        `restore_hit`, the first answer after a KV slot restore, also the cached tokens it reused."""
        usage = self.metrics.record_usage(record.model, tail)
        record.prompt_tokens = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
        record.completion_tokens = _count(usage.get("completion_tokens", usage.get("output_tokens")))
        if record.prompt_tokens is None and record.completion_tokens is None:
            self._tokens_from_timings(record, tail)
        if restore_hit:
            self.metrics.record_restore_hit(record.model, tail)

    def _tokens_from_timings(self, record: RequestRecord, tail: bytes) -> None:
        """llama.cpp's `timings` when an answer has no `usage` (a stream without include_usage, its own
        /completion): the prompt is what it evaluated plus what it reused from the cache."""
        timings = last_object(tail, TIMINGS_KEY)
        evaluated, cached, predicted = (_count(timings.get(k)) for k in ("prompt_n", "cache_n", "predicted_n"))
        if evaluated is not None:
            record.prompt_tokens = evaluated + (cached or 0)
        record.completion_tokens = predicted
        for kind, value in (("prompt", record.prompt_tokens), ("completion", predicted)):
            if value:
                self.metrics.tokens.labels(record.model, kind).inc(value)

    def abandon(self, record: RequestRecord) -> None:
        """The client left before its request was sent to a model server (while it waited for one)."""
        record.status = 499
        self._end(record, Outcome.CLIENT_GONE)

    def refused(self, record: RequestRecord, status: int) -> None:
        """Berth answered `status` itself before any model server was asked."""
        record.status = status
        self._end(record, Outcome.REFUSED)

    def end(self, record: RequestRecord, outcome: Outcome) -> None:
        """The answer from a model server (or the attempt to get one) is over: count it."""
        if not self._end(record, outcome):
            return
        self.metrics.requests.labels(record.model, str(record.status)).inc()
        self.metrics.latency.labels(record.model).observe(record.duration)

    def _end(self, record: RequestRecord, outcome: Outcome) -> bool:
        if record.ended is not None:
            return False  # counted already: a request is counted once
        record.ended = time.perf_counter()
        record.outcome = outcome
        if self._log_requests:
            log.info("request %s %s -> %d in %.3fs", record.model, record.path, record.status, record.duration)
        self._recent.appendleft(record)
        if self._on_end is not None:
            self._on_end(record)
        return True

    def recent(self) -> list[dict[str, object]]:
        """The newest requests first, as `/api/requests` shows them."""
        return [record.as_json() for record in self._recent]


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
