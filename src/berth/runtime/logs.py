"""Per-source log ring buffers with live subscribers (for /logs and /logs/stream)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LogLine:
    source: str  # "berth" or a model id
    text: str
    at: float  # wall-clock seconds
    upstream: bool = False  # printed by a model server (not written by berth about it)


class LogHub:
    """Keeps the last lines of each source and fans new lines out to subscribers."""

    def __init__(self, lines_per_source: int = 2000) -> None:
        self._size = lines_per_source
        self._rings: dict[str, deque[LogLine]] = {}
        self._subscribers: set[tuple[asyncio.Queue[LogLine], str | None]] = set()
        self.echo_upstream: Callable[[LogLine], None] | None = None  # also gets every model server's line

    def write(self, source: str, text: str, upstream: bool = False) -> None:
        """A line from `source`; `upstream` when a model server printed it (not berth about it)."""
        line = LogLine(source, text.rstrip("\n"), time.time(), upstream)
        if upstream and self.echo_upstream is not None:
            self.echo_upstream(line)
        self._rings.setdefault(source, deque(maxlen=self._size)).append(line)
        for queue, wanted in list(self._subscribers):
            if wanted is None or wanted == source:
                if queue.qsize() < 10_000:  # a stalled reader loses lines rather than memory
                    queue.put_nowait(line)

    def tail(self, source: str | None = None, limit: int | None = None) -> list[LogLine]:
        if source is not None:
            lines = list(self._rings.get(source, ()))
        else:
            lines = sorted((line for ring in self._rings.values() for line in ring), key=lambda x: x.at)
        return lines[-limit:] if limit else lines

    def subscribe(self, source: str | None = None) -> asyncio.Queue[LogLine]:
        queue: asyncio.Queue[LogLine] = asyncio.Queue()
        self._subscribers.add((queue, source))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[LogLine]) -> None:
        self._subscribers = {(q, s) for q, s in self._subscribers if q is not queue}
