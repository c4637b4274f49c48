"""Who must stop for whom: group swaps and the matrix (`Swaps`), and the memory budget (`MemoryRoom`,
with the per-pass `MemoryLedger`), which picks its victims and says why as a `StopWhy`. Pure functions of
the model records they are given; the plan pass (plan.py) carries out what they decide."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from berth.core.errors import InsufficientMemory
from berth.scheduler.actions import StopWhy
from berth.scheduler.policies import Eviction, GroupPolicy, MatrixPolicy, MemoryPolicy
from berth.scheduler.records import IDLE_CAPABLE, ModelRecord, ModelState, live


@dataclass(frozen=True)
class Swaps:
    """Which models may not run together, by groups or by the matrix (DESIGN.md, "Conflict")."""

    models: Mapping[str, ModelRecord]
    groups: Mapping[str, GroupPolicy]
    matrix: MatrixPolicy | None

    def conflicts(self, model: str, other: str) -> bool:
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

    def clash(self, a: str, b: str) -> bool:
        return self.conflicts(a, b) or self.conflicts(b, a)

    def blockers(self, model: str, running: list[str]) -> list[str]:
        """Running models that must stop before `model` may start, by its groups or the matrix."""
        if self.matrix is not None:
            return self.matrix.evictions(model, running)
        return [o for o in running if self.conflicts(model, o)]

    @property
    def rule(self) -> str:
        return "matrix" if self.matrix is not None else "group"


@dataclass
class MemoryLedger:
    """Planned bytes per device during one plan pass.

    `now` counts every live process (a stopping one holds its memory until it is gone);
    `later` counts what stays once the stops under way have finished. Both shrink as
    starts are granted or reserved in queue order, so a later request cannot take the
    room an earlier one is waiting for.
    """

    models: Mapping[str, ModelRecord]
    now: dict[str, int]
    later: dict[str, int]

    def short_now(self, need: Mapping[str, int]) -> dict[str, int]:
        """Per device, how much of `need` does not fit in what is left now (the devices it does not fit)."""
        return {d: amount - max(self.now.get(d, 0), 0) for d, amount in need.items()
                if amount and amount > self.now.get(d, 0)}

    def fits_now(self, need: Mapping[str, int]) -> bool:
        return all(amount <= self.now.get(d, 0) for d, amount in need.items() if amount)

    def fits_later(self, need: Mapping[str, int], victims: list[str]) -> bool:
        freed: dict[str, int] = {}
        for victim in victims:
            for device, amount in self.models[victim].held().items():
                freed[device] = freed.get(device, 0) + amount
        return all(amount <= self.later.get(d, 0) + freed.get(d, 0) for d, amount in need.items() if amount)

    def take(self, need: Mapping[str, int]) -> None:
        for device, amount in need.items():
            self.now[device] = self.now.get(device, 0) - amount
            self.later[device] = self.later.get(device, 0) - amount

    def reserve(self, need: Mapping[str, int], victims: list[str]) -> None:
        """Hold `need` for a start that waits for `victims` (and stops under way) to finish."""
        for victim in victims:
            for device, amount in self.models[victim].held().items():
                self.later[device] = self.later.get(device, 0) + amount
        self.take(need)


@dataclass(frozen=True)
class RoomPlan:
    """How a start in the scheduled group gets its memory: it fits now, or `victims` stop for it."""

    model: str
    fits_now: bool  # it fits beside what runs: take `load` and start
    start: bool  # it may start once the victims' stops are begun (unknown size, nothing else live)
    victims: list[str]
    load: Mapping[str, int] | None  # what the start adds per device; None: unknown size (it runs alone)
    alone: list[str]  # victims of unknown size (they never share)
    rule: str | None  # the eviction order that chose the other victims

    def why(self, victim: ModelRecord, name: str, short: Mapping[str, int] | None, now: float) -> StopWhy:
        """The facts of `victim`'s eviction, taken before its stop begins."""
        rule = "unknown size" if name in self.alone or self.load is None else self.rule
        return StopWhy(for_model=self.model, need=self.load, short=short, idle_s=victim.idle_for(now),
                       rule=rule, freed=dict(victim.held()))


@dataclass(frozen=True)
class MemoryRoom:
    """The memory policy over the live models: who shares the budget, who is too big, who makes room."""

    policy: MemoryPolicy | None
    models: Mapping[str, ModelRecord]

    @property
    def running(self) -> list[str]:
        return live(self.models)  # asked afresh: a start begun in this pass makes its model live

    def scheduled(self, model: str) -> bool:
        return self.policy is not None and self.models[model].policy.group == self.policy.scheduled_group

    def ledger(self) -> MemoryLedger:
        budgets = dict(self.policy.budgets) if self.policy else {}
        now, later = dict(budgets), dict(budgets)
        for model in self.running:
            if not self.scheduled(model):
                continue
            m = self.models[model]
            for device, amount in m.held().items():
                now[device] = now.get(device, 0) - amount
                if m.state is not ModelState.STOPPING:
                    later[device] = later.get(device, 0) - amount
        return MemoryLedger(self.models, now, later)

    def too_big(self, model: str) -> InsufficientMemory | None:
        """The error for a model that cannot fit even with every unpinned model stopped."""
        need = self.models[model].policy.memory
        if self.policy is None or need is None:
            return None
        held: dict[str, int] = {}
        pinned = [o for o in self.running if o != model and self.models[o].policy.pinned and self.scheduled(o)]
        for other in pinned:
            for device, amount in self.models[other].held().items():
                held[device] = held.get(device, 0) + amount
        available = {d: self.policy.budgets.get(d, 0) - held.get(d, 0) for d in need}
        if all(need[d] <= available[d] for d in need if need[d]):
            return None
        note = f" (pinned models {', '.join(pinned)} hold the rest)" if pinned and any(held.values()) else ""
        return InsufficientMemory(model, dict(need), available, note)

    def _shared(self, model: str) -> list[str]:
        """The live unpinned members of the scheduled group besides `model`: those it shares memory with."""
        return [o for o in self.running if o != model and self.scheduled(o) and not self.models[o].policy.pinned]

    def eviction_order(self, candidates: list[str], busy: Callable[[str], bool]) -> list[str]:
        """Idle models before busy ones; then least recently used (or largest) first."""
        def key(model: str) -> tuple[bool, float, float]:
            m = self.models[model]
            size = sum(m.held().values())
            if self.policy is not None and self.policy.eviction is Eviction.LARGEST:
                return (busy(model), -size, m.idle_since)
            return (busy(model), m.idle_since, -size)
        return sorted(candidates, key=key)

    def plan(self, model: str, ledger: MemoryLedger, draining: set[str], busy: Callable[[str], bool]) -> RoomPlan:
        """Make room for `model`: it fits now, or the victims to stop (none yet while starts under way
        hold the rest). A model of unknown size (or retrying after an out-of-memory start) never shares:
        it runs alone beside pinned models, and whatever starts next waits for it to go."""
        need = self.models[model].need()
        others = self._shared(model)
        evictable = [o for o in others if self.models[o].state in IDLE_CAPABLE and o not in draining]
        alone = [o for o in evictable if self.models[o].need() is None]
        rule = self.policy.eviction.value if self.policy is not None else None
        if need is None:
            return RoomPlan(model, False, not others, evictable, None, alone, rule)
        load = self.models[model].to_load(need)
        if not any(self.models[o].need() is None for o in others) and ledger.fits_now(load):
            return RoomPlan(model, True, True, [], load, [], rule)
        victims = list(alone)
        for other in self.eviction_order([o for o in evictable if o not in alone], busy):
            if ledger.fits_later(load, victims):
                break
            victims.append(other)
        if not ledger.fits_later(load, victims):
            victims = alone  # starts under way hold the rest: evict nothing else until they are ready
        return RoomPlan(model, False, False, victims, load, alone, rule)

    def may_return(self, target: str, ledger: MemoryLedger) -> bool:
        """Whether a return_to target fits beside what runs now, needing no one stopped (its bytes taken)."""
        need = self.models[target].need()
        others = [o for o in self.running if self.scheduled(o) and not self.models[o].policy.pinned]
        if need is None:
            return not others
        if any(self.models[o].need() is None for o in others) or not ledger.fits_now(need):
            return False
        ledger.take(need)
        return True
