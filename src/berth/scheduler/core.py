"""Pure scheduling decisions: (state, event) -> actions. No I/O, no clocks, no sleeps.

The `Scheduler` here takes the events and keeps the state; the rest of the package decides with it:
policies.py and actions.py (what goes in and out), records.py (a model's record and its steps),
turns.py (the waiting queue and its order), eviction.py (who stops for whom, and why), plan.py (the
pass that ends every event). See DESIGN.md next to this file for the states and invariants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from berth.core.errors import (
    BerthError,
    InsufficientMemory,
    ModelUnloaded,
    ShuttingDown,
    StartBackedOff,
    TooManyRequests,
)
from berth.scheduler.actions import Action, Reject, StopReason
from berth.scheduler.eviction import MemoryRoom
from berth.scheduler.plan import PlanPass
from berth.scheduler.policies import Client, GroupPolicy, MatrixPolicy, MemoryPolicy, ModelPolicy, QueuePolicy
from berth.scheduler.records import ModelRecord, ModelState, ModelView, live
from berth.scheduler.turns import WaitQueue

# A model whose start failed twice in a row waits before the next try: 2 s, 4 s, ... at most a minute.
# Each try of a broken model can evict others for memory and reload gigabytes; retrying at the pace
# of incoming requests turns one broken model into constant reloading of every other.
BACKOFF_FIRST_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 60.0


@dataclass
class Scheduler:
    """Decides which model processes run and which requests may proceed.

    Every public method takes the event (and `now`, a monotonic time in
    seconds) and returns the actions the shell must perform, in order.
    """

    models: dict[str, ModelRecord] = field(default_factory=dict)
    groups: dict[str, GroupPolicy] = field(default_factory=dict)
    memory: MemoryPolicy | None = None
    matrix: MatrixPolicy | None = None  # when set, it decides which models run together (groups do not)
    queue: QueuePolicy = field(default_factory=QueuePolicy)
    # The state the plan pass (plan.py) reads and moves:
    waiting: WaitQueue = field(default_factory=WaitQueue)
    admitted: dict[int, str] = field(default_factory=dict)  # request id -> model, for requests in flight
    in_slots: set[int] = field(default_factory=set)  # requests in flight that hold one of their model's slots
    removed: set[str] = field(default_factory=set)  # gone from the config, known until their processes are gone
    returning: set[str] = field(default_factory=set)  # return_to targets of models a TTL just stopped
    closing: bool = False
    clock: float = 0.0  # the time of the last plan pass

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
                self.models[model_id] = ModelRecord(policy)
        self.removed = {m for m in self.models if m not in models}
        for model_id in list(self.removed):
            self._forget_if_removed(model_id)
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
        if self.closing:
            return [Reject(request_id, model, ShuttingDown())]
        m = self.models[model]
        if m.state is ModelState.FAILED and m.retry_at is not None and now < m.retry_at:
            return [Reject(request_id, model, StartBackedOff(model, m.failures, m.retry_at - now, m.last_error))]
        if m.in_flight + self.waiting.count(model) >= m.policy.concurrency_limit:
            return [Reject(request_id, model, TooManyRequests(model, m.policy.concurrency_limit))]
        self.waiting.add(request_id, model, now, client, uses_slot)
        return self._plan(now)

    def cancel(self, request_id: int, now: float) -> list[Action]:
        """The client of a waiting request went away: forget it."""
        self.waiting.discard(request_id)
        return self._plan(now)

    def finished(self, request_id: int, now: float) -> list[Action]:
        """An admitted request ended (success or not)."""
        model = self.admitted.pop(request_id, None)
        if model is not None and model in self.models:
            m = self.models[model]
            m.in_flight -= 1
            if request_id in self.in_slots:
                m.in_slots -= 1
            if m.in_flight == 0:
                m.idle_since = now
        self.in_slots.discard(request_id)
        return self._plan(now)

    def started(self, model: str, now: float) -> list[Action]:
        """The model is ready to serve: its start or wake finished, or a sleeping one woke by itself."""
        m = self.models[model]
        if m.state not in (ModelState.STARTING, ModelState.SLEEPING):
            return []
        m.became_ready(now)
        return self._plan(now)

    def slept(self, model: str, observed_at: float, now: float) -> list[Action]:
        """The model's server said at `observed_at` that it sleeps. Taken only if nothing used the model
        since: a request admitted meanwhile has woken it (or will), and its memory is counted as in use."""
        m = self.models.get(model)
        if (m is None or m.state is not ModelState.READY or m.in_flight or self.waiting.count(model)
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
        if getattr(error, "out_of_memory", False) and not m.oom_retry and model not in self.removed:
            m.oom_retry = True
            m.state = ModelState.STOPPED
            return self._plan(now)
        m.oom_retry = False
        m.state = ModelState.FAILED
        m.last_error = error
        m.failures += 1
        if m.failures >= 2:
            m.retry_at = now + min(BACKOFF_FIRST_SECONDS * 2 ** (m.failures - 2), BACKOFF_MAX_SECONDS)
        rejected = self.waiting.reject(model, error)
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
            rejected = self.waiting.reject(model, ModelUnloaded(model, reason.value))
        if reason is StopReason.TTL and m.policy.return_to not in (None, model):
            assert m.policy.return_to is not None
            self.returning.add(m.policy.return_to)
        self._forget_if_removed(model)
        return [*rejected, *self._plan(now)]

    def unload(self, model: str | None, now: float, reason: StopReason = StopReason.UNLOAD, force: bool = False) -> list[Action]:
        """Stop `model` (or every model). Waits for in-flight requests unless `force`."""
        targets = [model] if model is not None else list(self.models)
        actions: list[Action] = []
        for model_id in targets:
            m = self.models[model_id]
            if m.state in (ModelState.STARTING, ModelState.SLEEPING):
                actions.append(m.begin_stop(model_id, reason, m.idle_why(now)))
            elif m.state is ModelState.READY:
                if m.in_flight == 0 or force:
                    actions.append(m.begin_stop(model_id, reason, m.idle_why(now)))
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
        self.closing = True
        return list(self.waiting.reject_all(ShuttingDown))

    def in_flight(self) -> int:
        """Requests admitted and not yet finished, over all models."""
        return len(self.admitted)

    def shutdown(self, now: float) -> list[Action]:
        """berth is exiting: refuse waiting and new requests, stop everything now."""
        self.closing = True
        actions: list[Action] = list(self.waiting.reject_all(ShuttingDown))
        for model_id, m in self.models.items():
            if m.state in (ModelState.STARTING, ModelState.READY, ModelState.SLEEPING):
                actions.append(m.begin_stop(model_id, StopReason.SHUTDOWN, m.idle_why(now)))
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
            queued=self.waiting.count(model),
            ttl_deadline=m.ttl_deadline(self.waiting.count(model)),
            start_failures=m.failures,
            retry_at=m.retry_at if m.state is ModelState.FAILED else None,
        )

    def queue_depth(self) -> int:
        return len(self.waiting)

    def next_deadline(self) -> float | None:
        """The earliest time at which `tick` may have something to do: a TTL, a waiting request
        reaching `max_wait`, a loaded model's residency ending while others wait."""
        deadlines = [d for d in (m.ttl_deadline(self.waiting.count(i)) for i, m in self.models.items())
                     if d is not None]
        if len(self.waiting):
            deadlines += [arrived + self.queue.max_wait for arrived in self.waiting.arrivals()]
            deadlines += [m.ready_at + self.queue.min_residency for m in self.models.values()
                          if m.state is ModelState.READY]
        later = [d for d in deadlines if d > self.clock]
        return min(later, default=None)

    def running(self) -> list[str]:
        """Models whose processes exist: starting, ready, sleeping or stopping."""
        return live(self.models)

    def held(self, model: str) -> Mapping[str, int]:
        """What a live model's process holds: its plan, or while it sleeps what it keeps (once measured)."""
        return self.models[model].held()

    def too_big(self, model: str) -> InsufficientMemory | None:
        """The error for a model that cannot fit even with every unpinned model stopped."""
        return MemoryRoom(self.memory, self.models).too_big(model)

    # -- internals ------------------------------------------------------------------

    def _plan(self, now: float) -> list[Action]:
        return PlanPass.of(self, now).run()

    def _forget_if_removed(self, model: str) -> None:
        """A model dropped from the config is forgotten once its process is gone."""
        if model in self.removed and self.models[model].state in (ModelState.STOPPED, ModelState.FAILED):
            del self.models[model]
            self.removed.discard(model)
