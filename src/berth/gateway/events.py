"""What happened to each model, in order: starts, ready, stops with the scheduler's reason, sleeps, wakes,
failures. The pool records an event as it carries out a scheduler action or hears from a process; the
dashboard's timeline and scripts read them from `GET /api/events?since=` (observability.py).

The log is bounded (the newest `keep` events) and numbered: `since` is the last number a reader has, so a
poller gets each event once and learns from `dropped` when it fell behind the bound.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.core.units import format_bytes
from berth.scheduler import StopReason, StopWhy

DEFAULT_KEEP = 1000


class EventKind(enum.StrEnum):
    START = "start"  # the scheduler started the model's process
    WAKE = "wake"  # it woke a sleeping one
    READY = "ready"  # the model serves
    SLEEP = "sleep"  # its server put the model to sleep (its process stays)
    STOP = "stop"  # the scheduler decided to stop it (the reason says why)
    STOPPED = "stopped"  # its process is gone after a stop
    CRASHED = "crashed"  # its process died without being asked
    FAILED = "failed"  # its start ended without it becoming ready


@dataclass(frozen=True)
class ModelEvent:
    seq: int  # 1, 2, ...: the order events happened in
    at: float  # the wall clock (Unix seconds)
    model: str
    kind: EventKind
    reason: str | None = None  # a stop's StopReason value
    why: Mapping[str, Any] = field(default_factory=dict)  # the facts behind it, as data
    text: str = ""  # the same in words

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": round(self.at, 3), "model": self.model, "kind": self.kind.value,
                "reason": self.reason, "why": dict(self.why), "text": self.text}


class EventLog:
    def __init__(self, keep: int = DEFAULT_KEEP) -> None:
        self._events: deque[ModelEvent] = deque(maxlen=keep)
        self._seq = itertools.count(1)

    def record(self, model: str, kind: EventKind, reason: str | None = None,
               why: Mapping[str, Any] | None = None, text: str = "") -> ModelEvent:
        event = ModelEvent(next(self._seq), time.time(), model, kind, reason, dict(why or {}), text)
        self._events.append(event)
        return event

    def stop(self, model: str, reason: StopReason, why: StopWhy) -> ModelEvent:
        """A stop the scheduler decided, with its facts and their sentence."""
        return self.record(model, EventKind.STOP, reason.value, stop_facts(why), describe_stop(model, reason, why))

    def since(self, seq: int = 0) -> tuple[list[ModelEvent], int]:
        """Events after number `seq`, oldest first, and how many of those the bound has already dropped."""
        events = [e for e in self._events if e.seq > seq]
        first = events[0].seq if events else None
        newest = self._events[-1].seq if self._events else 0
        dropped = (first - seq - 1) if first is not None else max(newest - seq, 0)
        return events, max(dropped, 0)

    def last_seq(self) -> int:
        return self._events[-1].seq if self._events else 0


def stop_facts(why: StopWhy) -> dict[str, Any]:
    """A stop's facts as JSON (the fields that are set)."""
    facts: dict[str, Any] = {"for_model": why.for_model, "idle_s": None if why.idle_s is None else round(why.idle_s, 1),
                             "rule": why.rule, "need_bytes": why.need, "short_bytes": why.short,
                             "freed_bytes": why.freed}
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in facts.items() if v is not None}


_RULES = {"lru": "least recently used", "largest": "largest", "unknown size": "its size is unknown (runs alone)",
          "group": "its group swaps", "matrix": "not in a matrix set with it"}


def describe_stop(model: str, reason: StopReason, why: StopWhy) -> str:
    """The stop in words, from its facts: 'evicted for b: needs 1.0 GiB on host (0.5 GiB short), a idle 40 s,
    least recently used'."""
    idle = f"{model} idle {why.idle_s:.0f} s" if why.idle_s is not None else f"{model} busy"
    if reason is StopReason.MEMORY:
        needs = ", ".join(f"{format_bytes(amount)} on {device}" + (
            f" ({format_bytes(why.short[device])} short)" if why.short and device in why.short else "")
            for device, amount in sorted((why.need or {}).items()) if amount)
        parts = [f"evicted for {why.for_model}" + (f": needs {needs}" if needs else ""), idle,
                 _RULES.get(why.rule or "", why.rule or "")]
        return ", ".join(p for p in parts if p)
    if reason is StopReason.SWAP:
        return f"swapped out for {why.for_model}: {_RULES.get(why.rule or '', 'they cannot run together')}, {idle}"
    if reason is StopReason.TTL:
        return f"TTL: {idle}"
    return {StopReason.UNLOAD: "unloaded through the API", StopReason.RELOAD: "its definition changed (config reload)",
            StopReason.SHUTDOWN: "berth is stopping"}.get(reason, reason.value)
