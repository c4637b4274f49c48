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

Records are numbered; the ledger knows the ones in flight, so the dashboard can list them and an admin can
cancel one (`cancel`: the proxy, while it relays the answer, leaves a way to stop it on the record). With
`captureBodies`, the newest requests keep their bodies, bounded and redacted (capture.py).
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from berth.gateway import capture
from berth.gateway.metrics import Metrics

log = logging.getLogger("berth.requests")


class Outcome(enum.Enum):
    ANSWERED = "answered"  # the model server's answer (whatever its status) went to the client
    REFUSED = "refused"  # berth answered itself before a model server was asked (queue full, start failed, ...)
    CLIENT_GONE = "client_gone"  # the client left before the answer ended (status 499)
    FAILED = "failed"  # the model server was unreachable, too slow or broke off (berth's 502 or 504)
    CANCELLED = "cancelled"  # an admin cancelled it (POST /api/requests/{id}/cancel); the client's answer was ended


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
    id: int = 0  # its number in the ledger
    first_token: float | None = None  # when the answer's first body bytes arrived (a stream's first event)
    cancel: Callable[[], None] | None = None  # set by the proxy while it relays the answer: stops it
    request_body: str | None = None  # captured (captureBodies), redacted
    response_body: str | None = None

    @property
    def duration(self) -> float:
        """Seconds from sending (or, if it was never sent, from taking it) to its end."""
        end = self.ended if self.ended is not None else time.perf_counter()
        return end - (self.sent if self.sent is not None else self.began)

    @property
    def ttft(self) -> float | None:
        """Seconds from sending it to the first bytes of its answer's body."""
        if self.first_token is None:
            return None
        return self.first_token - (self.sent if self.sent is not None else self.began)

    @property
    def tokens_per_second(self) -> float | None:
        """Completion tokens over the time from the first token to the end."""
        if not self.completion_tokens or self.first_token is None or self.ended is None:
            return None
        span = self.ended - self.first_token
        return self.completion_tokens / span if span > 0 else None

    def as_json(self) -> dict[str, object]:
        """The shape of `/api/requests` entries."""
        ttft, rate = self.ttft, self.tokens_per_second
        return {"id": self.id, "at": self.began_at + ((self.ended or self.began) - self.began), "model": self.model,
                "path": self.path, "key": self.key, "status": self.status, "duration_s": round(self.duration, 4),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "ttft_s": None if ttft is None else round(ttft, 4),
                "tokens_per_s": None if rate is None else round(rate, 1),
                "in_flight": self.ended is None, "outcome": self.outcome.value if self.outcome else None,
                "cancellable": self.ended is None and self.cancel is not None,
                "captured": self.request_body is not None or self.response_body is not None}

    def detail(self) -> dict[str, object]:
        """`/api/requests/{id}`: the entry with its captured bodies."""
        return {**self.as_json(), "request_body": self.request_body, "response_body": self.response_body}


class RequestLedger:
    def __init__(self, metrics: Metrics, keep: int, log_requests: bool = False,
                 on_end: Callable[[RequestRecord], None] | None = None, capture_bodies: bool = False) -> None:
        self.metrics = metrics
        self._recent: deque[RequestRecord] = deque(maxlen=keep)
        self._log_requests = log_requests
        self._on_end = on_end
        self._ids = itertools.count(1)
        self._open: dict[int, RequestRecord] = {}  # begun and not yet ended
        self.capture_bodies = capture_bodies
        self._captured: deque[RequestRecord] = deque()  # the newest capture.KEEP records with bodies

    def configure(self, keep: int, log_requests: bool, capture_bodies: bool = False) -> None:
        """Keep the newest `keep` requests (llama-swap's metricsMaxInMemory); log a line for each request
        when `log_requests` (its logRequests); keep bodies when `capture_bodies`."""
        if keep != self._recent.maxlen:
            self._recent = deque(self._recent, maxlen=keep)
        self._log_requests = log_requests
        self.capture_bodies = capture_bodies

    def begin(self, model: str, path: str, key: str | None = None) -> RequestRecord:
        record = RequestRecord(model, path, time.perf_counter(), time.time(), key, id=next(self._ids))
        self._open[record.id] = record
        return record

    def capture_request(self, record: RequestRecord, body: bytes | None, content_type: str) -> None:
        if self.capture_bodies:
            record.request_body = capture.request_text(body, content_type)

    def capture_response(self, record: RequestRecord, head: bytes, total: int) -> None:
        if self.capture_bodies and head:
            record.response_body = capture.response_text(head, total)

    def first_token(self, record: RequestRecord) -> None:
        if record.first_token is None:
            record.first_token = time.perf_counter()

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
        record.prompt_tokens, record.completion_tokens = self.metrics.count_answer(record.model, tail, restore_hit)

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
        record.cancel = None
        self._open.pop(record.id, None)
        if record.request_body is not None or record.response_body is not None:
            self._captured.append(record)
            if len(self._captured) > capture.KEEP:
                dropped = self._captured.popleft()
                dropped.request_body = dropped.response_body = None
        if self._log_requests:
            log.info("request %s %s -> %d in %.3fs", record.model, record.path, record.status, record.duration)
        self._recent.appendleft(record)
        if self._on_end is not None:
            self._on_end(record)
        return True

    def recent(self) -> list[dict[str, object]]:
        """The requests in flight, then the newest ended ones first, as `/api/requests` shows them."""
        return [record.as_json() for record in [*reversed(self._open.values()), *self._recent]]

    def find(self, request_id: int) -> RequestRecord | None:
        """A request in flight or among the recent ones."""
        found = self._open.get(request_id)
        return found if found is not None else next((r for r in self._recent if r.id == request_id), None)

    def cancel(self, request_id: int) -> RequestRecord | None:
        """Stop a request whose answer is being relayed: the proxy ends the client's answer and drops the
        model server's request, and the record ends as cancelled. None when it is not in flight with an answer
        under way."""
        record = self._open.get(request_id)
        if record is None or record.cancel is None:
            return None
        record.cancel()
        return record

