"""What the scheduler answers: the actions the shell carries out, in order, and the facts behind a stop."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

from berth.core.errors import BerthError


class StopReason(enum.StrEnum):
    """Why a model is stopped (a str, so it compares and formats as its value)."""

    SWAP = "swap"  # a group swap or an exclusive group needs it gone
    MEMORY = "memory"  # evicted to make room for another model
    TTL = "ttl"  # idle for its TTL
    UNLOAD = "unload"  # asked for through the API
    RELOAD = "reload"  # its definition changed or it was removed from the config
    SHUTDOWN = "shutdown"  # berth is stopping


@dataclass(frozen=True)
class Start:
    model: str


@dataclass(frozen=True)
class Wake:
    """Wake a sleeping model's process (its model loads again); `started` follows, or `stopped` if it dies."""

    model: str


@dataclass(frozen=True)
class StopWhy:
    """The facts behind a stop, as the scheduler weighed them (the shell records them; the dashboard's
    timeline shows them). Which fields are set depends on the reason: `for_model` for a swap or an
    eviction, `need` and `short` for an eviction, `idle_s` for any stop of an idle model."""

    for_model: str | None = None  # the model whose start needs this one gone
    need: Mapping[str, int] | None = None  # what that start adds, per device
    short: Mapping[str, int] | None = None  # of that, what did not fit in the budget left, per device
    idle_s: float | None = None  # how long this model had been idle (None: it was busy, or never ready)
    rule: str | None = None  # why this one was chosen: "lru", "largest", "unknown size", "ttl", "group", "matrix"
    freed: Mapping[str, int] | None = None  # what its stop frees by the scheduler's count, per device


@dataclass(frozen=True)
class Stop:
    model: str
    reason: StopReason
    why: StopWhy = field(default=StopWhy(), compare=False)  # data for the record; equality is model + reason


@dataclass(frozen=True)
class Admit:
    request_id: int
    model: str


@dataclass(frozen=True)
class Reject:
    request_id: int
    model: str
    error: BerthError


Action = Union[Start, Wake, Stop, Admit, Reject]
