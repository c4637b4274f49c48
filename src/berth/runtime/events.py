"""What a model process reports to its owner (the pool): `Started`, then exactly one of `StartFailedEvent`
or `Stopped`, with `Slept` and `Woke` in between for a server that sleeps when idle."""

from __future__ import annotations

from dataclasses import dataclass

from berth.core.errors import StartFailed


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class StartFailedEvent:
    error: StartFailed


@dataclass(frozen=True)
class Stopped:
    crashed: bool
    exit_code: int | None


@dataclass(frozen=True)
class Slept:
    """The ready server fell asleep (its model left memory); seen by a check sent at `observed_at`
    (the event loop's clock)."""

    observed_at: float


@dataclass(frozen=True)
class Woke:
    """The sleeping server has its model loaded again (berth woke it, or a request from elsewhere did)."""


ProcessEvent = Started | StartFailedEvent | Stopped | Slept | Woke
