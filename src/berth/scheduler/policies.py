"""What the scheduler is told: the policies of models, groups, the matrix, memory and the queue, and who a
request comes from. Plain values; the scheduler never changes them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


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
class Client:
    """Who a request comes from, for fairness among waiting requests (an API key's name; "" for all requests
    without one) and its weight: a client of weight 2 gets two turns for another's one."""

    name: str = ""
    weight: int = 1
