"""Pure scheduling decisions: (state, event) -> actions. No I/O, no clocks, no sleeps.

See DESIGN.md next to this file for the states and invariants.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from collections.abc import Mapping
from fractions import Fraction
from typing import Union

from berth.core.errors import (
    BerthError, InsufficientMemory, ModelUnloaded, ShuttingDown, StartBackedOff, TooManyRequests,
)

# A model whose start failed twice in a row waits before the next try: 2 s, 4 s, ... at most a minute.
# Each try of a broken model can evict others for memory and reload gigabytes; retrying at the pace
# of incoming requests turns one broken model into constant reloading of every other.
BACKOFF_FIRST_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 60.0


class ModelState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"  # a start, or a wake from sleeping, under way
    READY = "ready"
    SLEEPING = "sleeping"  # the process runs, its model left memory (llama-server's --sleep-idle-seconds)
    STOPPING = "stopping"
    FAILED = "failed"


class StopReason(enum.StrEnum):
    """Why a model is stopped (a str, so it compares and formats as its value)."""

    SWAP = "swap"  # a group swap or an exclusive group needs it gone
    MEMORY = "memory"  # evicted to make room for another model
    TTL = "ttl"  # idle for its TTL
    UNLOAD = "unload"  # asked for through the API
    RELOAD = "reload"  # its definition changed or it was removed from the config
    SHUTDOWN = "shutdown"  # berth is stopping


class Eviction(enum.StrEnum):
    """Which idle models go first when memory must be freed."""

    LRU = "lru"  # least recently used first, larger on ties
    LARGEST = "largest"  # larger first, least recently used on ties


@dataclass(frozen=True)
class ModelPolicy:
    """What the scheduler needs to know about one model."""

    group: str
    ttl: float = 0  # seconds idle before a stop; 0 = never
    concurrency_limit: int = 10
    memory: Mapping[str, int] | None = None  # planned bytes per device; None = unknown (runs alone)
    pinned: bool = False  # never stopped to make room by memory
    priority: int = 0  # waiting requests for higher-priority models are served first (llama-swap's fifo.priority)
    return_to: str | None = None  # after a TTL stop, start this model if nothing waits (the everyday model)
    parallel: int = 0  # requests its server works on at once (its slots); more wait here, clients taking turns. 0: no cap


@dataclass(frozen=True)
class GroupPolicy:
    swap: bool = True  # only one member runs at a time
    exclusive: bool = True  # starting a member stops models of other groups
    persistent: bool = False  # never stopped to make room for another group


@dataclass(frozen=True)
class MatrixPolicy:
    """llama-swap's matrix: the combinations of models that may run together, instead of groups.

    Any subset of a set may run. To start a model, the set containing it that costs least to reach
    wins: the sum of the eviction costs of the running models outside it (ties: the earlier set).
    A model in no set runs alone."""

    sets: tuple[frozenset[str], ...]
    evict_costs: Mapping[str, float] = field(default_factory=dict)  # default 1 per model

    def together(self, a: str, b: str) -> bool:
        return any(a in s and b in s for s in self.sets)

    def evictions(self, model: str, running: list[str]) -> list[str]:
        """The running models (besides `model`) to stop so that `model` may start."""
        candidates = [s for s in self.sets if model in s]
        if not candidates:
            return [o for o in running if o != model]

        def cost(allowed: frozenset[str]) -> float:
            return sum(self.evict_costs.get(o, 1) for o in running if o not in allowed)

        best = min(candidates, key=cost)  # min keeps the first of equal costs: definition order
        return [o for o in running if o != model and o not in best]


@dataclass(frozen=True)
class MemoryPolicy:
    """Admit models by planned memory instead of by swap groups."""

    budgets: Mapping[str, int]  # usable bytes per device (headroom already taken off)
    scheduled_group: str | None = None  # the group whose members share memory (None: only refuse the too-big)
    eviction: Eviction = Eviction.LRU


@dataclass(frozen=True)
class QueuePolicy:
    """When a swap waits for the loaded model's work (DESIGN.md, "Batching").

    The defaults (0, 0) are plain arrival order: every waiting request that needs a swap has it at once."""

    max_wait: float = 0.0  # seconds a request may wait for a busy model's turn to end; then it goes next
    min_residency: float = 0.0  # seconds a freshly loaded model with work keeps its turn, even against those


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


@dataclass
class _Model:
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


@dataclass(frozen=True)
class Client:
    """Who a request comes from, for fairness among waiting requests (an API key's name; "" for all requests
    without one) and its weight: a client of weight 2 gets two turns for another's one."""

    name: str = ""
    weight: int = 1


@dataclass(frozen=True)
class _Waiting:
    """A request in the queue: its model, when it arrived, its turn among clients (fair queueing,
    `_next_turn`), and whether it takes one of its model's `parallel` slots (requests that only read the
    server take none)."""

    model: str
    arrived: float
    turn: Fraction = Fraction(0)
    uses_slot: bool = True


@dataclass
class ModelView:
    """A read-only snapshot of one model, for the API and metrics."""

    state: ModelState
    in_flight: int
    queued: int
    ttl_deadline: float | None = None  # when an idle model will be stopped (the scheduler's clock)
    start_failures: int = 0  # starts that failed in a row
    retry_at: float | None = None  # when the next start may be tried, while backing off


LIVE = (ModelState.STARTING, ModelState.READY, ModelState.SLEEPING, ModelState.STOPPING)  # a process exists
IDLE_CAPABLE = (ModelState.READY, ModelState.SLEEPING)  # may be stopped by a swap, an eviction, a TTL


@dataclass
class Scheduler:
    """Decides which model processes run and which requests may proceed.

    Every public method takes the event (and `now`, a monotonic time in
    seconds) and returns the actions the shell must perform, in order.
    """

    models: dict[str, _Model] = field(default_factory=dict)
    groups: dict[str, GroupPolicy] = field(default_factory=dict)
    memory: MemoryPolicy | None = None
    matrix: MatrixPolicy | None = None  # when set, it decides which models run together (groups do not)
    queue: QueuePolicy = field(default_factory=QueuePolicy)
    _queue: dict[int, _Waiting] = field(default_factory=dict)  # request id -> what it waits for, in arrival order
    _in_flight: dict[int, str] = field(default_factory=dict)
    _in_slots: set[int] = field(default_factory=set)  # requests in flight that hold one of their model's slots
    _round: Fraction = Fraction(0)  # the latest turn admitted
    _last_turn: dict[str, Fraction] = field(default_factory=dict)  # per client, the latest turn given out
    _removed: set[str] = field(default_factory=set)
    _returning: set[str] = field(default_factory=set)  # return_to targets of models a TTL just stopped
    _closing: bool = False
    _clock: float = 0.0  # the time of the last plan pass

    @classmethod
    def build(cls, models: dict[str, ModelPolicy], groups: dict[str, GroupPolicy],
              memory: MemoryPolicy | None = None, matrix: MatrixPolicy | None = None,
              queue: QueuePolicy | None = None) -> "Scheduler":
        scheduler = cls()
        scheduler.configure(models, groups, memory, matrix, queue)
        return scheduler

    # -- configuration --------------------------------------------------------------

    def configure(self, models: dict[str, ModelPolicy], groups: dict[str, GroupPolicy],
                  memory: MemoryPolicy | None = None, matrix: MatrixPolicy | None = None,
                  queue: QueuePolicy | None = None) -> None:
        """Replace policies, keeping the runtime state of models that still exist.

        A model that is gone but still running stays known until it has stopped.
        """
        for model_id, policy in models.items():
            if model_id in self.models:
                self.models[model_id].policy = policy
            else:
                self.models[model_id] = _Model(policy)
        self._removed = {m for m in self.models if m not in models}
        for model_id in list(self._removed):
            if self.models[model_id].state in (ModelState.STOPPED, ModelState.FAILED):
                del self.models[model_id]
                self._removed.discard(model_id)
        self.groups = dict(groups)
        self.memory = memory
        self.matrix = matrix
        self.queue = queue or QueuePolicy()

    def set_memory(self, model: str, memory: Mapping[str, int] | None, now: float) -> list[Action]:
        """A better figure for a model's memory (measured after a start): later decisions use it."""
        m = self.models.get(model)
        if m is None:
            return []
        m.policy = replace(m.policy, memory=memory)
        return self._plan(now)

    def set_sleeping_memory(self, model: str, memory: Mapping[str, int], now: float) -> list[Action]:
        """What the model's process keeps while it sleeps, as measured: the rest of its plan is free then."""
        m = self.models.get(model)
        if m is None:
            return []
        m.sleeping_memory = dict(memory)
        return self._plan(now)

    # -- events ---------------------------------------------------------------------

    def request(self, request_id: int, model: str, now: float, client: Client = Client(),
                uses_slot: bool = True) -> list[Action]:
        """A request names `model` (an id the caller has checked exists), from `client`; `uses_slot`: it
        takes one of the model's `parallel` slots while in flight."""
        if self._closing:
            return [Reject(request_id, model, ShuttingDown())]
        m = self.models[model]
        if m.state is ModelState.FAILED and m.retry_at is not None and now < m.retry_at:
            return [Reject(request_id, model, StartBackedOff(model, m.failures, m.retry_at - now, m.last_error))]
        if m.in_flight + self._waiting_for(model) >= m.policy.concurrency_limit:
            return [Reject(request_id, model, TooManyRequests(model, m.policy.concurrency_limit))]
        self._queue[request_id] = _Waiting(model, now, self._next_turn(client), uses_slot)
        return self._plan(now)

    def cancel(self, request_id: int, now: float) -> list[Action]:
        """The client of a waiting request went away: forget it."""
        self._queue.pop(request_id, None)
        return self._plan(now)

    def finished(self, request_id: int, now: float) -> list[Action]:
        """An admitted request ended (success or not)."""
        model = self._in_flight.pop(request_id, None)
        if model is not None and model in self.models:
            m = self.models[model]
            m.in_flight -= 1
            if request_id in self._in_slots:
                m.in_slots -= 1
            if m.in_flight == 0:
                m.idle_since = now
        self._in_slots.discard(request_id)
        return self._plan(now)

    def started(self, model: str, now: float) -> list[Action]:
        """The model is ready to serve: its start or wake finished, or a sleeping one woke by itself."""
        m = self.models[model]
        if m.state not in (ModelState.STARTING, ModelState.SLEEPING):
            return []
        m.state = ModelState.READY
        m.asleep = False
        m.idle_since = m.ready_at = now
        m.last_error = None
        m.oom_retry = False
        m.failures, m.retry_at = 0, None
        return self._plan(now)

    def slept(self, model: str, observed_at: float, now: float) -> list[Action]:
        """The model's server said at `observed_at` that it sleeps. Taken only if nothing used the model
        since: a request admitted meanwhile has woken it (or will), and its memory is counted as in use."""
        m = self.models.get(model)
        if (m is None or m.state is not ModelState.READY or m.in_flight or self._waiting_for(model)
                or m.idle_since > observed_at):
            return []
        m.state = ModelState.SLEEPING
        m.asleep = True
        return self._plan(now)

    def start_failed(self, model: str, error: BerthError, now: float) -> list[Action]:
        """The start ended without the model becoming ready; its process is gone.

        A first out-of-memory failure is retried once, after every other evictable model stopped.
        """
        m = self.models[model]
        if getattr(error, "out_of_memory", False) and not m.oom_retry and model not in self._removed:
            m.oom_retry = True
            m.state = ModelState.STOPPED
            return self._plan(now)
        m.oom_retry = False
        m.state = ModelState.FAILED
        m.last_error = error
        m.failures += 1
        if m.failures >= 2:
            m.retry_at = now + min(BACKOFF_FIRST_SECONDS * 2 ** (m.failures - 2), BACKOFF_MAX_SECONDS)
        rejected = self._reject_waiting(model, error)
        self._forget_if_removed(model)
        return [*rejected, *self._plan(now)]

    def stopped(self, model: str, now: float) -> list[Action]:
        """The model's process is gone (a planned stop finished, or it crashed)."""
        m = self.models[model]
        m.state = ModelState.STOPPED
        m.asleep = False
        m.unload_reason = None
        reason, m.stop_reason = m.stop_reason, None
        if reason is None:
            m.keep_alive = None  # it died: a client's keep_alive was for that run
        rejected: list[Reject] = []
        if reason in (StopReason.UNLOAD, StopReason.SHUTDOWN):
            # Requests that waited for this model must not silently start it again.
            rejected = self._reject_waiting(model, ModelUnloaded(model, reason.value))
        if reason is StopReason.TTL and m.policy.return_to not in (None, model):
            assert m.policy.return_to is not None
            self._returning.add(m.policy.return_to)
        self._forget_if_removed(model)
        return [*rejected, *self._plan(now)]

    def unload(self, model: str | None, now: float, reason: StopReason = StopReason.UNLOAD, force: bool = False) -> list[Action]:
        """Stop `model` (or every model). Waits for in-flight requests unless `force`."""
        targets = [model] if model is not None else list(self.models)
        actions: list[Action] = []
        for model_id in targets:
            m = self.models[model_id]
            if m.state in (ModelState.STARTING, ModelState.SLEEPING):
                actions.append(self._begin_stop(model_id, reason, self._idle_why(model_id, now)))
            elif m.state is ModelState.READY:
                if m.in_flight == 0 or force:
                    actions.append(self._begin_stop(model_id, reason, self._idle_why(model_id, now)))
                else:
                    m.unload_reason = reason
        return actions + self._plan(now)

    def keep_alive(self, model: str, seconds: float | None, now: float) -> list[Action]:
        """A client sets how long `model` stays loaded once idle (Ollama's keep_alive): `0` stops it as soon
        as it is idle, `math.inf` never, None goes back to its policy's TTL. It holds for the current run
        (or the next one, when the model is not running) and ends when that run's stop begins."""
        m = self.models.get(model)
        if m is None:
            return []
        m.keep_alive = seconds
        return self._plan(now)

    def forgive(self, model: str) -> None:
        """Its definition changed: the next request may try a start at once."""
        if model in self.models:
            self.models[model].failures, self.models[model].retry_at = 0, None

    def drain(self, now: float) -> list[Action]:
        """berth stops taking work: refuse waiting and new requests; in-flight ones go on, models stay."""
        self._closing = True
        rejected: list[Action] = [Reject(r, w.model, ShuttingDown()) for r, w in self._queue.items()]
        self._queue.clear()
        return rejected

    def in_flight(self) -> int:
        """Requests admitted and not yet finished, over all models."""
        return len(self._in_flight)

    def shutdown(self, now: float) -> list[Action]:
        """berth is exiting: refuse waiting and new requests, stop everything now."""
        self._closing = True
        actions: list[Action] = [Reject(r, w.model, ShuttingDown()) for r, w in self._queue.items()]
        self._queue.clear()
        for model_id, m in self.models.items():
            if m.state in (ModelState.STARTING, ModelState.READY, ModelState.SLEEPING):
                actions.append(self._begin_stop(model_id, StopReason.SHUTDOWN, self._idle_why(model_id, now)))
        return actions

    def tick(self, now: float) -> list[Action]:
        """Time passed: stop models whose TTL ran out, give turns to requests that waited long enough."""
        return self._plan(now)

    # -- queries ----------------------------------------------------------------------

    def state(self, model: str) -> ModelState:
        return self.models[model].state

    def view(self, model: str) -> ModelView:
        m = self.models[model]
        return ModelView(
            state=m.state,
            in_flight=m.in_flight,
            queued=self._waiting_for(model),
            ttl_deadline=self._ttl_deadline(model),
            start_failures=m.failures,
            retry_at=m.retry_at if m.state is ModelState.FAILED else None,
        )

    def queue_depth(self) -> int:
        return len(self._queue)

    def next_deadline(self) -> float | None:
        """The earliest time at which `tick` may have something to do: a TTL, a waiting request
        reaching `max_wait`, a loaded model's residency ending while others wait."""
        deadlines = [d for d in (self._ttl_deadline(m) for m in self.models) if d is not None]
        if self._queue:
            deadlines += [w.arrived + self.queue.max_wait for w in self._queue.values()]
            deadlines += [m.ready_at + self.queue.min_residency for m in self.models.values()
                          if m.state is ModelState.READY]
        later = [d for d in deadlines if d > self._clock]
        return min(later, default=None)

    def running(self) -> list[str]:
        """Models whose processes exist: starting, ready, sleeping or stopping."""
        return [m for m, s in self.models.items() if s.state in LIVE]

    # -- internals ------------------------------------------------------------------

    def _waiting_for(self, model: str) -> int:
        return sum(1 for w in self._queue.values() if w.model == model)

    def _reject_waiting(self, model: str, error: BerthError) -> list[Reject]:
        rejected = [Reject(r, model, error) for r, w in self._queue.items() if w.model == model]
        for reject in rejected:
            del self._queue[reject.request_id]
        return rejected

    def _ttl_deadline(self, model: str) -> float | None:
        m = self.models[model]
        ttl = _idle_ttl(m)
        if m.state not in IDLE_CAPABLE or m.in_flight or ttl == math.inf or self._waiting_for(model):
            return None
        return m.idle_since + ttl

    def _begin_stop(self, model: str, reason: StopReason, why: StopWhy = StopWhy()) -> Stop:
        m = self.models[model]
        m.state = ModelState.STOPPING
        m.unload_reason = None
        m.stop_reason = reason
        m.keep_alive = None  # a client's keep_alive was for the run that ends here
        return Stop(model, reason, why)

    def _idle_why(self, model: str, now: float, rule: str | None = None) -> StopWhy:
        """The facts of a stop that makes room for nothing (TTL, unload, reload, shutdown)."""
        return StopWhy(idle_s=self._idle_for(model, now), rule=rule, freed=dict(self.held(model)))

    def _idle_for(self, model: str, now: float) -> float | None:
        """Seconds a ready (or sleeping) model without requests has been idle; None otherwise."""
        m = self.models[model]
        if m.state not in IDLE_CAPABLE or m.in_flight:
            return None
        return max(now - m.idle_since, 0.0)

    def _forget_if_removed(self, model: str) -> None:
        """A model dropped from the config is forgotten once its process is gone."""
        if model in self._removed and self.models[model].state in (ModelState.STOPPED, ModelState.FAILED):
            del self.models[model]
            self._removed.discard(model)

    def _conflicts(self, model: str, other: str) -> bool:
        """Would starting `model` require `other` to be stopped?"""
        if model == other:
            return False
        if self.matrix is not None:
            return not self.matrix.together(model, other)
        mine = self.models[model].policy.group
        theirs = self.models[other].policy.group
        if mine == theirs:
            return self.groups[mine].swap
        return self.groups[mine].exclusive and not self.groups[theirs].persistent

    def _blockers(self, model: str) -> list[str]:
        """Running models that must stop before `model` may start, by its groups or the matrix."""
        if self.matrix is not None:
            return self.matrix.evictions(model, self.running())
        return [o for o in self.running() if self._conflicts(model, o)]

    def _due(self, waiting: _Waiting, now: float) -> bool:
        """Waited `max_wait`: it goes next, whatever the swap costs the loaded model's queue."""
        return now - waiting.arrived >= self.queue.max_wait

    def _next_turn(self, client: Client) -> Fraction:
        """Start-time fair queueing with unit costs: a client's requests take turns 1/weight apart, and a
        client that had nothing waiting starts at the latest turn admitted. So a client with many
        requests waiting cannot push back one that sends a single request: that one goes next (after
        any request already holding that same turn), then they alternate. With one client, turns rise
        with arrival: plain arrival order."""
        turn = max(self._round, self._last_turn.get(client.name, Fraction(-1)) + Fraction(1, client.weight))
        self._last_turn[client.name] = turn
        return turn

    def _queue_in_order(self, now: float) -> list[tuple[int, _Waiting]]:
        """Waiting requests in the order the plan pass serves them: those of models with a request past
        `max_wait` first, then higher-priority models first, then by turn among clients, then arrival order
        (a stable sort). Due-ness is the model's, so among one model's requests (who gets its next slot)
        the turns decide, however long each has waited."""
        due = {waiting.model for waiting in self._queue.values() if self._due(waiting, now)}

        def key(item: tuple[int, _Waiting]) -> tuple[bool, int, Fraction]:
            waiting = item[1]
            return (waiting.model not in due, -self.models[waiting.model].policy.priority, waiting.turn)
        return sorted(self._queue.items(), key=key)

    def _keeps_turn(self, other: str, waiting: _Waiting, now: float, draining: set[str]) -> bool:
        """Whether running `other` keeps serving instead of stopping for the `waiting` request's model:
        it is ready and has work (requests in flight or waiting for it), and either is within its
        `min_residency` or the request has not yet waited `max_wait`."""
        o = self.models[other]
        if o.state is not ModelState.READY or other in draining:
            return False
        if not o.in_flight and not self._waiting_for(other):
            return False
        if now < o.ready_at + self.queue.min_residency:
            return True
        return not self._due(waiting, now)

    def _clash(self, a: str, b: str) -> bool:
        return self._conflicts(a, b) or self._conflicts(b, a)

    def _memory_scheduled(self, model: str) -> bool:
        return self.memory is not None and self.models[model].policy.group == self.memory.scheduled_group

    def _need(self, model: str) -> Mapping[str, int] | None:
        m = self.models[model]
        return None if m.oom_retry else m.policy.memory

    def held(self, model: str) -> Mapping[str, int]:
        """What a live model's process holds: its plan, or while it sleeps what it keeps (once measured)."""
        m = self.models[model]
        if m.asleep and m.sleeping_memory is not None:
            return m.sleeping_memory
        return m.policy.memory or {}

    def _to_load(self, model: str, need: Mapping[str, int]) -> dict[str, int]:
        """What starting (or waking) `model` adds: a sleeping process already holds part of it."""
        held = self.held(model) if self.models[model].state is ModelState.SLEEPING else {}
        return {device: max(amount - held.get(device, 0), 0) for device, amount in need.items()}

    def too_big(self, model: str) -> InsufficientMemory | None:
        """The error for a model that cannot fit even with every unpinned model stopped."""
        need = self.models[model].policy.memory
        if self.memory is None or need is None:
            return None
        budgets = self.memory.budgets
        held: dict[str, int] = {}
        pinned = [o for o in self.running() if o != model and self.models[o].policy.pinned
                  and self._memory_scheduled(o)]
        for other in pinned:
            for device, amount in self.held(other).items():
                held[device] = held.get(device, 0) + amount
        available = {d: budgets.get(d, 0) - held.get(d, 0) for d in need}
        if all(need[d] <= available[d] for d in need if need[d]):
            return None
        note = f" (pinned models {', '.join(pinned)} hold the rest)" if pinned and any(held.values()) else ""
        return InsufficientMemory(model, dict(need), available, note)

    def _eviction_order(self, candidates: list[str]) -> list[str]:
        """Idle models before busy ones; then least recently used (or largest) first."""
        def size(model: str) -> int:
            return sum(self.held(model).values())

        def key(model: str) -> tuple[bool, float, float]:
            m = self.models[model]
            busy = m.in_flight > 0 or self._waiting_for(model) > 0
            if self.memory is not None and self.memory.eviction is Eviction.LARGEST:
                return (busy, -size(model), m.idle_since)
            return (busy, m.idle_since, -size(model))
        return sorted(candidates, key=key)

    def _plan_memory_start(self, model: str, waiting: _Waiting, now: float, ledger: "_MemoryLedger",
                           draining: set[str], actions: list[Action]) -> bool | None:
        """Make room for `model` by planned memory. True when it can start now, False when it waits for
        the stops begun here (or under way), None when making room would stop a model that keeps its turn."""
        need = self._need(model)
        others = [o for o in self.running() if o != model and self._memory_scheduled(o)
                  and not self.models[o].policy.pinned]
        evictable = [o for o in others if self.models[o].state in IDLE_CAPABLE and o not in draining]
        # A model of unknown size (or retrying after an out-of-memory start) never shares: it runs alone
        # beside pinned models, and whatever starts next waits for it to go.
        alone = [o for o in evictable if self._need(o) is None]
        load: dict[str, int] = {}
        if need is None:
            victims = evictable
            room = not others
        else:
            load = self._to_load(model, need)
            if not any(self._need(o) is None for o in others) and ledger.fits_now(load):
                ledger.take(load)
                return True
            victims = list(alone)
            for other in self._eviction_order([o for o in evictable if o not in alone]):
                if ledger.fits_later(load, victims):
                    break
                victims.append(other)
            if not ledger.fits_later(load, victims):
                victims = alone  # starts under way hold the rest: evict nothing else until they are ready
            room = False
        if any(self._keeps_turn(o, waiting, now, draining) for o in victims):
            return None
        short = ledger.short_now(load) if need is not None else None
        if need is not None:
            ledger.reserve(load, victims)
        rule = self.memory.eviction.value if self.memory is not None else None
        for other in victims:
            draining.add(other)
            if self.models[other].in_flight == 0:
                why = StopWhy(for_model=model, need=load if need is not None else None, short=short,
                              idle_s=self._idle_for(other, now),
                              rule="unknown size" if other in alone or need is None else rule,
                              freed=dict(self.held(other)))
                actions.append(self._begin_stop(other, StopReason.MEMORY, why))
        return room

    def _plan(self, now: float) -> list[Action]:
        self._clock = now
        actions: list[Action] = []
        draining: set[str] = set()  # ready models that must stop so an earlier request's model can start
        claimed: list[str] = []  # stopped (or sleeping) models that earlier requests are waiting to start
        ledger = _MemoryLedger.of(self)
        for request_id, waiting in self._queue_in_order(now):
            model = waiting.model
            if model in self._removed:
                self._queue.pop(request_id)
                actions.append(Reject(request_id, model, ModelUnloaded(model, "removed from the config")))
                continue
            m = self.models[model]
            if m.state is ModelState.READY and model not in draining and m.unload_reason is None:
                if waiting.uses_slot and m.policy.parallel and m.in_slots >= m.policy.parallel:
                    continue  # every slot of its server is busy: it waits for the next, in turn
                actions.append(self._admit(request_id))
                continue
            if m.state not in (ModelState.STOPPED, ModelState.FAILED, ModelState.SLEEPING) or model in claimed:
                continue  # waits for the start, the stop, or the drain under way
            too_big = self.too_big(model)
            if too_big is not None:
                self._queue.pop(request_id)
                actions.append(Reject(request_id, model, too_big))
                continue
            if any(self._clash(model, other) for other in claimed):
                continue  # an earlier request's swap goes first
            blockers = self._blockers(model)
            if any(self._keeps_turn(other, waiting, now, draining) for other in blockers):
                continue  # the loaded model serves its queue first (batching)
            room: bool | None = True
            if self._memory_scheduled(model):
                room = self._plan_memory_start(model, waiting, now, ledger, draining, actions)
                if room is None:
                    continue  # the same, for a model that must make room by memory
            claimed.append(model)
            for other in blockers:
                o = self.models[other]
                if o.state in IDLE_CAPABLE:
                    draining.add(other)
                    if o.in_flight == 0:
                        why = StopWhy(for_model=model, idle_s=self._idle_for(other, now),
                                      rule="matrix" if self.matrix is not None else "group",
                                      freed=dict(self.held(other)))
                        actions.append(self._begin_stop(other, StopReason.SWAP, why))
            if not blockers and room:
                actions.append(self._begin_start(model))
        for model_id, m in self.models.items():
            if m.state not in IDLE_CAPABLE or m.in_flight:
                continue
            if m.unload_reason is not None:
                actions.append(self._begin_stop(model_id, m.unload_reason, self._idle_why(model_id, now)))
            elif model_id in self._removed:
                actions.append(self._begin_stop(model_id, StopReason.RELOAD, self._idle_why(model_id, now)))
            else:
                deadline = self._ttl_deadline(model_id)
                if deadline is not None and now >= deadline:
                    actions.append(self._begin_stop(model_id, StopReason.TTL, self._idle_why(model_id, now, "ttl")))
        returning, self._returning = self._returning, set()
        for target in returning:
            if self._may_return_to(target, now, ledger):
                actions.append(self._begin_start(target))
        return actions

    def _admit(self, request_id: int) -> Admit:
        waiting = self._queue.pop(request_id)
        model = waiting.model
        self._in_flight[request_id] = model
        m = self.models[model]
        m.in_flight += 1
        if waiting.uses_slot:
            self._in_slots.add(request_id)
            m.in_slots += 1
        self._round = max(self._round, waiting.turn)
        return Admit(request_id, model)

    def _begin_start(self, model: str) -> Start | Wake:
        m = self.models[model]
        waking = m.state is ModelState.SLEEPING
        m.state = ModelState.STARTING
        m.asleep = False  # from now on its whole plan counts
        return Wake(model) if waking else Start(model)

    def _may_return_to(self, target: str, now: float, ledger: "_MemoryLedger") -> bool:
        """A model's `return_to` starts after its TTL stop only when nothing waits and it needs nothing
        stopped: no request is delayed and no other model loses its place for it."""
        t = self.models.get(target)
        if (t is None or self._queue or self._closing or target in self._removed
                or t.state not in (ModelState.STOPPED, ModelState.FAILED)
                or (t.retry_at is not None and now < t.retry_at)
                or self.too_big(target) is not None or self._blockers(target)):
            return False
        if not self._memory_scheduled(target):
            return True
        need = self._need(target)
        others = [o for o in self.running() if self._memory_scheduled(o) and not self.models[o].policy.pinned]
        if need is None:
            return not others
        if any(self._need(o) is None for o in others) or not ledger.fits_now(need):
            return False
        ledger.take(need)
        return True


def _idle_ttl(m: _Model) -> float:
    """Seconds an idle ready model stays loaded: a client's keep_alive, else its policy (0 there: never)."""
    if m.keep_alive is not None:
        return m.keep_alive
    return m.policy.ttl if m.policy.ttl > 0 else math.inf


@dataclass
class _MemoryLedger:
    """Planned bytes per device during one plan pass.

    `now` counts every live process (a stopping one holds its memory until it is gone);
    `later` counts what stays once the stops under way have finished. Both shrink as
    starts are granted or reserved in queue order, so a later request cannot take the
    room an earlier one is waiting for.
    """

    scheduler: Scheduler
    now: dict[str, int]
    later: dict[str, int]

    @classmethod
    def of(cls, scheduler: Scheduler) -> "_MemoryLedger":
        budgets = dict(scheduler.memory.budgets) if scheduler.memory else {}
        now, later = dict(budgets), dict(budgets)
        for model in scheduler.running():
            if not scheduler._memory_scheduled(model):
                continue
            for device, amount in scheduler.held(model).items():
                now[device] = now.get(device, 0) - amount
                if scheduler.models[model].state is not ModelState.STOPPING:
                    later[device] = later.get(device, 0) - amount
        return cls(scheduler, now, later)

    def _memory(self, model: str) -> Mapping[str, int]:
        return self.scheduler.held(model)

    def short_now(self, need: Mapping[str, int]) -> dict[str, int]:
        """Per device, how much of `need` does not fit in what is left now (the devices it does not fit)."""
        return {d: amount - max(self.now.get(d, 0), 0) for d, amount in need.items()
                if amount and amount > self.now.get(d, 0)}

    def fits_now(self, need: Mapping[str, int]) -> bool:
        return all(amount <= self.now.get(d, 0) for d, amount in need.items() if amount)

    def fits_later(self, need: Mapping[str, int], victims: list[str]) -> bool:
        freed: dict[str, int] = {}
        for victim in victims:
            for device, amount in self._memory(victim).items():
                freed[device] = freed.get(device, 0) + amount
        return all(amount <= self.later.get(d, 0) + freed.get(d, 0) for d, amount in need.items() if amount)

    def take(self, need: Mapping[str, int]) -> None:
        for device, amount in need.items():
            self.now[device] = self.now.get(device, 0) - amount
            self.later[device] = self.later.get(device, 0) - amount

    def reserve(self, need: Mapping[str, int], victims: list[str]) -> None:
        """Hold `need` for a start that waits for `victims` (and stops under way) to finish."""
        for victim in victims:
            for device, amount in self._memory(victim).items():
                self.later[device] = self.later.get(device, 0) + amount
        self.take(need)
