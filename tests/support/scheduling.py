"""Driving the pure scheduler with random events, as a model pool would: requests, finished requests,
starts and stops completing, cancels, ticks (and a test's own kind of event).

`RandomWalk.step()` sends one random event and checks what every policy keeps: never two starts (or
wakes) of one model at once, never a model with requests in flight stopped, admissions only to ready
models; with `one_at_a_time` (a swap group of them all), never a start while another model runs.
Tests add their own checks on the actions and the state after each step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from berth.scheduler import Action, Admit, ModelState, Reject, Scheduler, Start, Stop, Wake


def random_events(scheduler: Scheduler, models: list[str], seed: int, steps: int,
                  ) -> Iterator[tuple[list[Action], dict[int, str]]]:
    """After each of `steps` random events: the actions the scheduler answered with, and the requests
    admitted and not finished yet (request id -> model), as the actions left them."""
    walk = RandomWalk(scheduler, models, random.Random(seed))
    for _ in range(steps):
        yield walk.step(), walk.admitted


class RandomWalk:
    def __init__(self, scheduler: Scheduler, models: str | list[str], rng: random.Random,
                 one_at_a_time: bool = False) -> None:
        self.s, self.models, self.rng = scheduler, models, rng
        self.one_at_a_time = one_at_a_time
        self.now = 0.0
        self.next_id = 0
        self.waiting: dict[int, str] = {}
        self.admitted: dict[int, str] = {}
        self.starting: set[str] = set()
        self.stopping: set[str] = set()

    def step(self, other: Callable[[float], list[Action]] | None = None) -> list[Action]:
        """One random event; `other(now)` takes a share of the ticks' turn when given."""
        rng, s = self.rng, self.s
        self.now += rng.random()
        choice = rng.random()
        if choice < 0.35:
            self.next_id += 1
            self.waiting[self.next_id] = rng.choice(self.models)
            actions = s.request(self.next_id, self.waiting[self.next_id], self.now)
        elif choice < 0.55 and self.admitted:
            request_id = rng.choice(list(self.admitted))
            del self.admitted[request_id]
            actions = s.finished(request_id, self.now)
        elif choice < 0.7 and self.starting:
            actions = s.started(self.starting.pop(), self.now)
        elif choice < 0.85 and self.stopping:
            actions = s.stopped(self.stopping.pop(), self.now)
        elif choice < 0.9 and self.waiting:
            request_id = rng.choice(list(self.waiting))
            del self.waiting[request_id]
            actions = s.cancel(request_id, self.now)
        elif other is not None and rng.random() < 0.7:
            actions = other(self.now)
        else:
            actions = s.tick(self.now)
        self.observe(actions)
        return actions

    def observe(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, (Start, Wake)):
                assert action.model not in self.starting, "two starts of one model"
                if self.one_at_a_time:
                    running = {m for m in self.models if m != action.model
                               and self.s.state(m) in (ModelState.READY, ModelState.STOPPING)}
                    assert not running, f"start of {action.model} while {running} still run in its swap group"
                    assert not self.starting, f"start of {action.model} while {self.starting} start"
                self.starting.add(action.model)
            elif isinstance(action, Stop):
                assert action.model not in self.admitted.values(), "stopped a model with requests in flight"
                self.starting.discard(action.model)
                self.stopping.add(action.model)
            elif isinstance(action, Admit):
                assert self.s.state(action.model) is ModelState.READY
                self.waiting.pop(action.request_id)
                self.admitted[action.request_id] = action.model
            elif isinstance(action, Reject):
                self.waiting.pop(action.request_id, None)
