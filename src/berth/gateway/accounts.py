"""Per API key: what it may still do now (its limits) and what it has used.

The request ledger hands every finished request that came with a key to `finished`; its counts go to
`/metrics` (`berth_key_*`) at once and to the usage database (`usage.py`) every `FLUSH_INTERVAL` seconds
and at shutdown, so a crash loses at most that much. `admit` checks a key's limits before its request
goes to a model:

- concurrency: its requests to models in flight or waiting;
- requestsPerMinute: the requests admitted in the last 60 seconds (a sliding window);
- tokensPerDay: prompt + completion tokens since 00:00 UTC (read back from the database at start). A
  request is refused once the day's tokens have reached the limit; the request that crosses it runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from berth.config import ApiKey
from berth.core.errors import KeyLimitReached
from berth.gateway.ledger import RequestRecord
from berth.gateway.metrics import Metrics
from berth.gateway.usagedb import Tally, UsageKey, UsageStore, hour_of

log = logging.getLogger("berth.usage")

FLUSH_INTERVAL = 5.0
MINUTE = 60.0
DAY = 86400


class KeyAccounts:
    def __init__(self, metrics: Metrics, store: UsageStore, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.store = store
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._admitted: dict[str, deque[float]] = {}  # admission times in the last minute, per key
        self._holding: set[int] = set()  # ids of admitted records not finished yet
        self._day = self._day_of(clock())
        self._day_tokens: dict[str, int] = {}
        self._pending: dict[UsageKey, Tally] = {}
        self._flusher: asyncio.Task[None] | None = None

    # -- lifetime -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Read today's tokens back (tokensPerDay holds across restarts) and start writing periodically."""
        day_start = self._day * DAY
        try:
            stored = await asyncio.to_thread(self.store.read, day_start)
        except sqlite3.Error as exc:
            log.warning(f"cannot read the usage database {self.store.path}: {exc}; counting from zero")
            stored = {}
        for (key, _, _), tally in stored.items():
            self._day_tokens[key] = self._day_tokens.get(key, 0) + tally.tokens
        self._flusher = asyncio.create_task(self._flush_periodically())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()
        await asyncio.to_thread(self.store.close)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.flush()

    async def flush(self) -> None:
        """Write what was counted since the last flush; on failure keep it for the next one."""
        batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            await asyncio.to_thread(self.store.add, batch, self._clock())
        except sqlite3.Error as exc:
            log.warning(f"cannot write the usage database {self.store.path}: {exc}; will try again")
            for usage_key, tally in batch.items():
                self._pending.setdefault(usage_key, Tally()).add(tally)

    # -- limits -------------------------------------------------------------------------------

    def admit(self, key: ApiKey, record: RequestRecord) -> None:
        """Count `record` against its key's limits, or raise KeyLimitReached (429, with Retry-After)."""
        now = self._clock()
        limits, name = key.limits, key.name
        if limits.concurrency and self._in_flight.get(name, 0) >= limits.concurrency:
            self._refuse(name, "concurrency", limits.concurrency, 1,
                         f"{limits.concurrency} of its requests are in flight or waiting")
        window = self._admitted.setdefault(name, deque()) if limits.requests_per_minute else None
        if window is not None:
            while window and window[0] <= now - MINUTE:
                window.popleft()
            if len(window) >= limits.requests_per_minute:
                self._refuse(name, "requestsPerMinute", limits.requests_per_minute,
                             max(1, math.ceil(window[0] + MINUTE - now)), "it sent that many in the last minute")
        if limits.tokens_per_day and self.tokens_today(name) >= limits.tokens_per_day:
            midnight = (self._day_of(now) + 1) * DAY
            self._refuse(name, "tokensPerDay", limits.tokens_per_day, max(1, math.ceil(midnight - now)),
                         f"it used {self.tokens_today(name)} tokens today (UTC)")
        if window is not None:
            window.append(now)
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        self._holding.add(id(record))
        self.metrics.key_in_flight.labels(name).set(self._in_flight[name])

    def _refuse(self, name: str, limit: str, value: int, retry_after: int, detail: str) -> None:
        self.refusal(name, limit)
        raise KeyLimitReached(name, limit, value, retry_after, detail)

    def refusal(self, name: str, reason: str) -> None:
        """A request of this key refused by its models, scopes or limits."""
        self.metrics.key_refusals.labels(name, reason).inc()

    def tokens_today(self, name: str) -> int:
        self._roll_day(self._clock())
        return self._day_tokens.get(name, 0)

    # -- usage --------------------------------------------------------------------------------

    def finished(self, record: RequestRecord) -> None:
        """A request with a key is over (answered, refused or failed): count it."""
        name = record.key
        if name is None:
            return
        if id(record) in self._holding:
            self._holding.discard(id(record))
            self._in_flight[name] -= 1
            self.metrics.key_in_flight.labels(name).set(self._in_flight[name])
        now = self._clock()
        tally = Tally(1, int(record.status >= 400), record.prompt_tokens or 0, record.completion_tokens or 0)
        self._pending.setdefault((name, record.model, hour_of(now)), Tally()).add(tally)
        self._roll_day(now)
        self._day_tokens[name] = self._day_tokens.get(name, 0) + tally.tokens
        self.metrics.count_key_usage(name, record.model, tally.errors > 0, tally.prompt_tokens,
                                     tally.completion_tokens)

    async def usage(self, since: float, key: str | None = None) -> dict[str, Any]:
        """Counts per key from the hour `since` falls in: totals, per model, and per hour."""
        await self.flush()
        rows = await asyncio.to_thread(self.store.read, hour_of(since), key)
        by_key: dict[str, dict[str, Any]] = {}
        for (name, model, hour), tally in sorted(rows.items(), key=lambda item: (item[0][0], item[0][2])):
            entry = by_key.setdefault(name, {"key": name, "total": Tally(), "models": {}, "hours": {}})
            entry["total"].add(tally)
            entry["models"].setdefault(model, Tally()).add(tally)
            entry["hours"].setdefault(hour, Tally()).add(tally)
        return {"since": hour_of(since), "until": self._clock(), "bucket_seconds": 3600, "keys": [
            {"key": name, **entry["total"].as_json(),
             "models": [{"model": model, **t.as_json()} for model, t in sorted(entry["models"].items())],
             "hours": [{"hour": hour, **t.as_json()} for hour, t in entry["hours"].items()]}
            for name, entry in sorted(by_key.items())]}

    def _roll_day(self, now: float) -> None:
        day = self._day_of(now)
        if day != self._day:
            self._day, self._day_tokens = day, {}

    @staticmethod
    def _day_of(epoch: float) -> int:
        return int(epoch // DAY)
