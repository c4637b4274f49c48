"""Batching in the pure scheduler: the loaded model serves its queue before a swap, bounded by
`max_wait` per request, with `min_residency` for a freshly loaded model (DESIGN.md, "Batching")."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest

from berth.scheduler import (
    Admit, Eviction, GroupPolicy, MatrixPolicy, MemoryPolicy, ModelPolicy, QueuePolicy, Scheduler, Start, Stop, Wake,
)
from tests.support.scheduling import RandomWalk

GiB = 1024**3
BATCHING = QueuePolicy(max_wait=30, min_residency=10)


def swap_group(*models: str, queue: QueuePolicy = BATCHING, priority: dict[str, int] | None = None) -> Scheduler:
    return Scheduler.build({m: ModelPolicy("g", concurrency_limit=1000, priority=(priority or {}).get(m, 0))
                            for m in models}, {"g": GroupPolicy(swap=True, exclusive=True)}, queue=queue)


def shared_memory(sizes: dict[str, int], budget: int = 10, queue: QueuePolicy = BATCHING) -> Scheduler:
    group = "(default)"
    return Scheduler.build({m: ModelPolicy(group, concurrency_limit=1000, memory={"host": size * GiB})
                            for m, size in sizes.items()},
                           {group: GroupPolicy(swap=False, exclusive=False)},
                           MemoryPolicy({"host": budget * GiB}, group, Eviction.LRU), queue=queue)


def loaded(s: Scheduler, model: str, request_id: int, now: float) -> None:
    """`model` started for `request_id`, which is now in flight."""
    assert s.request(request_id, model, now) == [Start(model)]
    assert s.started(model, now) == [Admit(request_id, model)]


def test_the_loaded_model_serves_its_queue_before_a_swap():
    s = swap_group("a", "b")
    loaded(s, "a", 1, 0)
    assert s.request(2, "b", 1) == []  # a is busy: b waits without draining it
    assert s.request(3, "a", 2) == [Admit(3, "a")]  # so a's later requests go on being served
    assert s.finished(1, 3) == []
    assert s.finished(3, 4) == [Stop("a", "swap")]  # a's work is done: now b's turn
    assert s.stopped("a", 5) == [Start("b")]
    assert s.started("b", 6) == [Admit(2, "b")]


def test_fifo_policy_drains_the_loaded_model_for_the_first_waiting_request():
    s = swap_group("a", "b", queue=QueuePolicy())
    loaded(s, "a", 1, 0)
    assert s.request(2, "b", 1) == []
    assert s.request(3, "a", 2) == []  # plain arrival order: a drains for b


def test_a_request_that_waited_max_wait_is_served_next():
    s = swap_group("a", "b")
    loaded(s, "a", 1, 0)
    s.request(2, "b", 1)
    assert s.next_deadline() == 10  # the end of a's residency: nothing changes then
    assert s.tick(10) == []
    assert s.next_deadline() == 1 + 30
    assert s.request(3, "a", 30.9) == [Admit(3, "a")]
    assert s.tick(31) == []  # b is due: a drains, but its requests in flight run to the end
    assert s.request(4, "a", 31.5) == []  # a takes no more work
    assert s.finished(1, 32) == []
    assert s.finished(3, 33) == [Stop("a", "swap")]
    assert s.stopped("a", 34) == [Start("b")]
    assert s.started("b", 35) == [Admit(2, "b")]
    assert s.view("a").queued == 1  # a's request waits for its own turn


def test_min_residency_keeps_a_fresh_model_that_has_work_even_against_a_due_request():
    s = swap_group("a", "b", queue=QueuePolicy(max_wait=1, min_residency=10))
    s.request(1, "a", 0)
    s.request(2, "b", 0.5)
    assert s.started("a", 2) == [Admit(1, "a")]  # b's request is due already, but a is fresh
    assert s.request(3, "a", 5) == [Admit(3, "a")]
    assert s.next_deadline() == 12  # the end of a's residency
    assert s.tick(12) == []  # a drains now
    assert s.request(4, "a", 12.5) == []
    s.finished(1, 13)
    assert s.finished(3, 14) == [Stop("a", "swap")]


def test_a_fresh_model_without_work_yields_at_once():
    s = swap_group("a", "b")
    loaded(s, "a", 1, 0)
    s.finished(1, 0.5)
    assert s.request(2, "b", 1) == [Stop("a", "swap")]  # idle: nothing of its turn to keep


def test_priorities_still_order_the_queue_and_due_requests_go_first():
    s = swap_group("a", "b", "c", priority={"c": 5})
    loaded(s, "a", 1, 0)
    s.request(2, "b", 1)
    s.request(3, "c", 2)
    assert s.finished(1, 3) == [Stop("a", "swap")]
    assert s.stopped("a", 4) == [Start("c")]  # llama-swap's fifo priority: c before the earlier b
    s2 = swap_group("a", "b", "c", priority={"c": 5})
    loaded(s2, "a", 1, 0)
    s2.request(2, "b", 1)
    s2.request(3, "c", 20)
    s2.tick(31)  # b waited max_wait: it goes before c, whatever c's priority
    assert s2.finished(1, 32) == [Stop("a", "swap")]
    assert s2.stopped("a", 33) == [Start("b")]


def test_matrix_models_that_may_run_together_are_not_held_back_by_batching():
    s = Scheduler.build({m: ModelPolicy("(default)") for m in "abc"}, {},
                        matrix=MatrixPolicy((frozenset("ab"), frozenset("c"))), queue=BATCHING)
    loaded(s, "a", 1, 0)
    assert s.request(2, "c", 1) == []  # c runs alone: it waits for a's turn
    assert s.request(3, "b", 2) == [Start("b")]  # b may join a at once
    assert s.started("b", 3) == [Admit(3, "b")]
    s.finished(3, 4)
    assert s.finished(1, 5) == [Stop("a", "swap"), Stop("b", "swap")]


def test_memory_eviction_waits_for_the_busy_models_turn_too():
    s = shared_memory({"a": 6, "b": 6})
    loaded(s, "a", 1, 0)
    assert s.request(2, "b", 1) == []  # b needs a's memory; a is busy: nothing drains yet
    assert s.request(3, "a", 2) == [Admit(3, "a")]
    s.finished(1, 3)
    assert s.finished(3, 4) == [Stop("a", "memory")]
    assert s.stopped("a", 5) == [Start("b")]
    s2 = shared_memory({"a": 6, "b": 6})
    loaded(s2, "a", 1, 0)
    s2.request(2, "b", 1)
    assert s2.tick(31) == []  # due: a drains for b
    assert s2.request(3, "a", 32) == []
    assert s2.finished(1, 33) == [Stop("a", "memory")]


def test_models_that_fit_together_never_wait_for_a_turn():
    s = shared_memory({"a": 4, "b": 4})
    loaded(s, "a", 1, 0)
    assert s.request(2, "b", 1) == [Start("b")]


# -- a discrete-event simulation: the scheduler against a shell with fixed start, stop and request times --


@dataclass
class Simulation:
    """Runs the scheduler as the pool would: starts take `start_s`, stops `stop_s`, each request
    `serve_s` once admitted; ticks at the scheduler's deadlines."""

    scheduler: Scheduler
    start_s: float = 1.5
    stop_s: float = 0.2
    serve_s: float = 0.5
    arrived: dict[int, float] = field(default_factory=dict)
    admitted: dict[int, float] = field(default_factory=dict)
    starts: int = 0
    _events: list[tuple[float, int, str, object]] = field(default_factory=list)
    _seq: int = 0

    def at(self, when: float, kind: str, what: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, what))

    def apply(self, actions: list, now: float) -> None:
        for action in actions:
            if isinstance(action, Admit):
                self.admitted[action.request_id] = now
                self.at(now + self.serve_s, "finished", action.request_id)
            elif isinstance(action, (Start, Wake)):
                self.starts += 1
                self.at(now + self.start_s, "started", action.model)
            elif isinstance(action, Stop):
                self.at(now + self.stop_s, "stopped", action.model)

    def run(self) -> None:
        while self._events:
            now, _, kind, what = heapq.heappop(self._events)
            s = self.scheduler
            if kind == "request":
                request_id, model = what
                self.arrived[request_id] = now
                self.apply(s.request(request_id, model, now), now)
            elif kind == "finished":
                self.apply(s.finished(what, now), now)
            elif kind == "started":
                self.apply(s.started(what, now), now)
            elif kind == "stopped":
                self.apply(s.stopped(what, now), now)
            else:
                self.apply(s.tick(now), now)
            deadline = s.next_deadline()
            if deadline is not None and not any(e[2] == "tick" and e[0] == deadline for e in self._events):
                self.at(deadline, "tick", None)

    def waits(self) -> list[float]:
        return [self.admitted[r] - self.arrived[r] for r in self.arrived]


def alternating(sim: Simulation, count: int, every: float, models: str = "ab", jitter: random.Random | None = None
                ) -> Simulation:
    for i in range(count):
        when = i * every + (jitter.random() * every if jitter else 0)
        sim.at(when, "request", (i, models[i % len(models)]))
    sim.run()
    return sim


@pytest.mark.parametrize("build", [swap_group, lambda *m, queue: shared_memory({x: 6 for x in m}, queue=queue)],
                         ids=["swap-group", "memory"])
def test_alternating_requests_take_fewer_swaps_than_fifo_and_none_waits_past_max_wait_plus_one_swap(build):
    policy = QueuePolicy(max_wait=5, min_residency=2)
    batched = alternating(Simulation(build("a", "b", queue=policy)), count=400, every=0.1)
    fifo = alternating(Simulation(build("a", "b", queue=QueuePolicy())), count=400, every=0.1)
    assert len(batched.admitted) == len(fifo.admitted) == 400  # every request served
    assert batched.starts * 5 <= fifo.starts
    one_swap = batched.serve_s + batched.stop_s + batched.start_s  # the loaded model drains, stops, the next starts
    assert max(batched.waits()) <= policy.max_wait + one_swap


@pytest.mark.parametrize("seed", range(20))
def test_random_arrivals_never_wait_past_max_wait_plus_one_swap(seed):
    rng = random.Random(seed)
    # (with no residency at all and max_wait shorter than a swap, every request is due when its model is
    # ready and the next swap starts at once: plain arrival order, which thrashes; DESIGN.md says so)
    policy = QueuePolicy(max_wait=rng.choice([2, 5, 8]), min_residency=rng.choice([0.5, 1, 2]))
    sim = Simulation(swap_group("a", "b", queue=policy), start_s=rng.uniform(0.5, 2), stop_s=rng.uniform(0, 0.5),
                     serve_s=rng.uniform(0.05, 1))
    sim = alternating(sim, count=300, every=rng.uniform(0.05, 0.5), jitter=rng)
    assert len(sim.admitted) == 300
    one_swap = sim.serve_s + sim.stop_s + sim.start_s  # the loaded model drains, stops, the next starts
    # a request that came as its own model began to drain also waits out the next model's residency
    assert max(sim.waits()) <= max(policy.max_wait, one_swap + policy.min_residency) + one_swap + 1e-9


@pytest.mark.parametrize("seed", range(30))
def test_random_event_sequences_under_batching_keep_the_invariants(seed):
    """Never two starts of one model, never a busy model stopped, never a start while a conflict runs,
    never an admission to a model that is not ready (RandomWalk checks each, at every step)."""
    rng = random.Random(seed)
    s = Scheduler.build({m: ModelPolicy("g", ttl=5, concurrency_limit=1000, priority=rng.choice([0, 0, 1]))
                         for m in "abc"}, {"g": GroupPolicy(swap=True, exclusive=True)},
                        queue=QueuePolicy(max_wait=rng.uniform(0, 5), min_residency=rng.uniform(0, 3)))
    walk = RandomWalk(s, "abc", rng, one_at_a_time=True)
    for _ in range(400):
        walk.step()
