"""Driving the pure scheduler with random events, as a model pool would: requests, finished requests,
starts and stops completing, ticks."""

from __future__ import annotations

import random
from collections.abc import Iterator

from berth.scheduler import Action, Admit, Scheduler, Start, Stop


def random_events(scheduler: Scheduler, models: list[str], seed: int, steps: int,
                  ) -> Iterator[tuple[list[Action], dict[int, str]]]:
    """After each of `steps` random events: the actions the scheduler answered with, and the requests
    admitted and not finished yet (request id -> model), as the actions left them."""
    rng = random.Random(seed)
    now, next_id = 0.0, 0
    admitted: dict[int, str] = {}
    starting: set[str] = set()
    stopping: set[str] = set()
    for _ in range(steps):
        now += rng.random()
        choice = rng.random()
        if choice < 0.4:
            next_id += 1
            actions = scheduler.request(next_id, rng.choice(models), now)
        elif choice < 0.6 and admitted:
            actions = scheduler.finished(admitted.pop(rng.choice(list(admitted))), now)
        elif choice < 0.75 and starting:
            actions = scheduler.started(starting.pop(), now)
        elif choice < 0.9 and stopping:
            actions = scheduler.stopped(stopping.pop(), now)
        else:
            actions = scheduler.tick(now)
        for action in actions:
            if isinstance(action, Start):
                assert action.model not in starting, f"{action.model} started twice"
                starting.add(action.model)
            elif isinstance(action, Stop):
                stopping.add(action.model)
            elif isinstance(action, Admit):
                admitted[action.request_id] = action.model
        yield actions, admitted
