"""What a requested model name means before ids and aliases are looked up: the active profile's pin,
then a selector's choice of target (llama-swap's profiles and selectors)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from berth.config import BerthConfig, SelectorSpec
from berth.core.errors import PinnedOff, ProfileNotFound
from berth.scheduler import ModelState

StateOf = Callable[[str], ModelState | None]  # a target's local model state; None for a peer's model


class Naming:
    """The active profile (none at start and after each reload, as in llama-swap) and the requests each
    spillover selector has sent to each target and not yet finished."""

    def __init__(self) -> None:
        self._active: tuple[BerthConfig, str] | None = None  # a profile is active in the config it was chosen in
        self._in_flight: Counter[tuple[str, str]] = Counter()

    def active_profile(self, config: BerthConfig) -> str | None:
        """The active profile's name; a reload (a new config) leaves none active."""
        return self._active[1] if self._active is not None and self._active[0] is config else None

    def activate(self, config: BerthConfig, name: str | None) -> None:
        if name is not None and name not in config.profiles:
            raise ProfileNotFound(name, list(config.profiles))
        self._active = (config, name) if name is not None else None

    @contextmanager
    def chosen(self, config: BerthConfig, requested: str, state_of: StateOf) -> Iterator[str]:
        """The name to look up for `requested`, held for the duration of the request."""
        name = requested
        profile = config.profiles.get(self.active_profile(config) or "")
        if profile is not None:
            pins = dict(profile.pins)
            if requested in pins:
                pinned = pins[requested]
                if pinned is None:
                    raise PinnedOff(requested, profile.id)
                name = pinned
        selector = config.selectors.get(name)
        if selector is None:
            yield name
            return
        target = choose(selector, state_of, lambda t: self._in_flight[(selector.id, t)])
        self._in_flight[(selector.id, target)] += 1
        try:
            yield target
        finally:
            self._in_flight[(selector.id, target)] -= 1


def choose(selector: SelectorSpec, state_of: StateOf, in_flight: Callable[[str], int]) -> str:
    """A selector's target for one request."""
    targets = selector.targets
    if selector.strategy == "pin":
        return targets[0]
    if selector.strategy == "warm":  # the first ready target, else the first starting, else the first
        for wanted in (ModelState.READY, ModelState.STARTING):
            for target in targets:
                if state_of(target) is wanted:
                    return target
        return targets[0]
    # spillover: fill the active targets up to `spillover` requests each, then start the next in order
    active, cold = [], []
    for target in targets:
        state = state_of(target)
        if state is ModelState.STOPPING:
            continue
        if state in (ModelState.READY, ModelState.STARTING) or in_flight(target) > 0:
            active.append(target)
        else:
            cold.append(target)
    if not active:
        return cold[0] if cold else targets[0]
    least = min(active, key=in_flight)  # the first of the least busy
    if in_flight(least) < selector.spillover or not cold:
        return least
    return cold[0]
