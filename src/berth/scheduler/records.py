"""A model as the scheduler keeps it: its state, its counts, and the steps that move it (a start, a stop,
becoming ready), each of which also clears what belonged to the run it ends."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from berth.core.errors import BerthError
from berth.scheduler.actions import Start, Stop, StopReason, StopWhy, Wake
from berth.scheduler.policies import ModelPolicy


class ModelState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"  # a start, or a wake from sleeping, under way
    READY = "ready"
    SLEEPING = "sleeping"  # the process runs, its model left memory (llama-server's --sleep-idle-seconds)
    STOPPING = "stopping"
    FAILED = "failed"


LIVE = (ModelState.STARTING, ModelState.READY, ModelState.SLEEPING, ModelState.STOPPING)  # a process exists
IDLE_CAPABLE = (ModelState.READY, ModelState.SLEEPING)  # may be stopped by a swap, an eviction, a TTL


@dataclass
class ModelView:
    """A read-only snapshot of one model, for the API and metrics."""

    state: ModelState
    in_flight: int
    queued: int
    ttl_deadline: float | None = None  # when an idle model will be stopped (the scheduler's clock)
    start_failures: int = 0  # starts that failed in a row
    retry_at: float | None = None  # when the next start may be tried, while backing off


@dataclass
class ModelRecord:
    """One model's runtime state in the scheduler."""

    policy: ModelPolicy
    state: ModelState = ModelState.STOPPED
    in_flight: int = 0
    in_slots: int = 0  # of those in flight, the ones holding one of its server's `parallel` slots
    idle_since: float = 0.0
    unload_reason: StopReason | None = None  # a stop asked for by the API, waiting for in-flight requests
    stop_reason: StopReason | None = None
    last_error: BerthError | None = None
    oom_retry: bool = False  # the last start died of out-of-memory: retry once with everything else evicted
    failures: int = 0  # starts that failed in a row
    retry_at: float | None = None  # no start before this (back-off after repeated failures)
    ready_at: float = 0.0  # when it last became ready (its residency counts from here)
    sleeping_memory: Mapping[str, int] | None = None  # what its process keeps while sleeping, once measured
    asleep: bool = False  # its process sleeps (SLEEPING, or STOPPING from there): it holds `sleeping_memory`
    keep_alive: float | None = None  # a client's idle TTL for this run (0: when idle, inf: never); None: the policy's

    # -- memory -----------------------------------------------------------------------

    def held(self) -> Mapping[str, int]:
        """What its live process holds: its plan, or while it sleeps what it keeps (once measured)."""
        if self.asleep and self.sleeping_memory is not None:
            return self.sleeping_memory
        return self.policy.memory or {}

    def need(self) -> Mapping[str, int] | None:
        """Its planned memory, or None when unknown or retrying after an out-of-memory start (it runs alone)."""
        return None if self.oom_retry else self.policy.memory

    def to_load(self, need: Mapping[str, int]) -> dict[str, int]:
        """What starting (or waking) it adds: a sleeping process already holds part of it."""
        held = self.held() if self.state is ModelState.SLEEPING else {}
        return {device: max(amount - held.get(device, 0), 0) for device, amount in need.items()}

    # -- idleness ---------------------------------------------------------------------

    def idle_ttl(self) -> float:
        """Seconds it stays loaded once idle: a client's keep_alive, else its policy (0 there: never)."""
        if self.keep_alive is not None:
            return self.keep_alive
        return self.policy.ttl if self.policy.ttl > 0 else math.inf

    def ttl_deadline(self, waiting: int) -> float | None:
        """When its TTL stops it, if it is idle with none of its `waiting` requests queued."""
        ttl = self.idle_ttl()
        if self.state not in IDLE_CAPABLE or self.in_flight or ttl == math.inf or waiting:
            return None
        return self.idle_since + ttl

    def idle_for(self, now: float) -> float | None:
        """Seconds a ready (or sleeping) model without requests has been idle; None otherwise."""
        if self.state not in IDLE_CAPABLE or self.in_flight:
            return None
        return max(now - self.idle_since, 0.0)

    def idle_why(self, now: float, rule: str | None = None) -> StopWhy:
        """The facts of a stop that makes room for nothing (TTL, unload, reload, shutdown)."""
        return StopWhy(idle_s=self.idle_for(now), rule=rule, freed=dict(self.held()))

    # -- transitions ------------------------------------------------------------------

    def begin_start(self, model: str) -> Start | Wake:
        waking = self.state is ModelState.SLEEPING
        self.state = ModelState.STARTING
        self.asleep = False  # from now on its whole plan counts
        return Wake(model) if waking else Start(model)

    def begin_stop(self, model: str, reason: StopReason, why: StopWhy = StopWhy()) -> Stop:
        self.state = ModelState.STOPPING
        self.unload_reason = None
        self.stop_reason = reason
        self.keep_alive = None  # a client's keep_alive was for the run that ends here
        return Stop(model, reason, why)

    def became_ready(self, now: float) -> None:
        self.state = ModelState.READY
        self.asleep = False
        self.idle_since = self.ready_at = now
        self.last_error = None
        self.oom_retry = False
        self.failures, self.retry_at = 0, None


def live(models: Mapping[str, ModelRecord]) -> list[str]:
    """Models whose processes exist: starting, ready, sleeping or stopping."""
    return [m for m, r in models.items() if r.state in LIVE]
