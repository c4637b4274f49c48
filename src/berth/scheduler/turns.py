"""The waiting requests and their order: clients take turns (start-time fair queueing), higher-priority
models go first, and a model whose request has waited `max_wait` goes before all (DESIGN.md, "Slots and
turns", "Batching")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction

from berth.core.errors import BerthError
from berth.scheduler.actions import Reject
from berth.scheduler.policies import Client


@dataclass(frozen=True)
class Waiting:
    """A request in the queue: its model, when it arrived, its turn among clients (fair queueing,
    `WaitQueue.add`), and whether it takes one of its model's `parallel` slots (requests that only read the
    server take none)."""

    model: str
    arrived: float
    turn: Fraction = Fraction(0)
    uses_slot: bool = True


def is_due(waiting: Waiting, now: float, max_wait: float) -> bool:
    """Waited `max_wait`: it goes next, whatever the swap costs the loaded model's queue."""
    return now - waiting.arrived >= max_wait


@dataclass
class WaitQueue:
    """Request id -> what it waits for, in arrival order, and the turns given out so far."""

    requests: dict[int, Waiting] = field(default_factory=dict)
    _round: Fraction = Fraction(0)  # the latest turn admitted
    _last_turn: dict[str, Fraction] = field(default_factory=dict)  # per client, the latest turn given out

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, request_id: int, model: str, now: float, client: Client, uses_slot: bool) -> None:
        self.requests[request_id] = Waiting(model, now, self._next_turn(client), uses_slot)

    def discard(self, request_id: int) -> None:
        self.requests.pop(request_id, None)

    def admit(self, request_id: int) -> Waiting:
        """Take a request out of the queue to run: its turn is now the latest admitted."""
        waiting = self.requests.pop(request_id)
        self._round = max(self._round, waiting.turn)
        return waiting

    def count(self, model: str) -> int:
        return sum(1 for w in self.requests.values() if w.model == model)

    def reject(self, model: str, error: BerthError) -> list[Reject]:
        """Refuse the waiting requests for `model` with `error`."""
        rejected = [Reject(r, model, error) for r, w in self.requests.items() if w.model == model]
        for reject in rejected:
            del self.requests[reject.request_id]
        return rejected

    def reject_all(self, error: Callable[[], BerthError]) -> list[Reject]:
        """Refuse every waiting request, each with an error of its own."""
        rejected = [Reject(r, w.model, error()) for r, w in self.requests.items()]
        self.requests.clear()
        return rejected

    def arrivals(self) -> Iterable[float]:
        return (w.arrived for w in self.requests.values())

    def _next_turn(self, client: Client) -> Fraction:
        """Start-time fair queueing with unit costs: a client's requests take turns 1/weight apart, and a
        client that had nothing waiting starts at the latest turn admitted. So a client with many
        requests waiting cannot push back one that sends a single request: that one goes next (after
        any request already holding that same turn), then they alternate. With one client, turns rise
        with arrival: plain arrival order."""
        turn = max(self._round, self._last_turn.get(client.name, Fraction(-1)) + Fraction(1, client.weight))
        self._last_turn[client.name] = turn
        return turn

    def in_order(self, now: float, max_wait: float, priority: Callable[[str], int]) -> list[tuple[int, Waiting]]:
        """Waiting requests in the order the plan pass serves them: those of models with a request past
        `max_wait` first, then higher-priority models first, then by turn among clients, then arrival order
        (a stable sort). Due-ness is the model's, so among one model's requests (who gets its next slot)
        the turns decide, however long each has waited."""
        due = {waiting.model for waiting in self.requests.values() if is_due(waiting, now, max_wait)}

        def key(item: tuple[int, Waiting]) -> tuple[bool, int, Fraction]:
            waiting = item[1]
            return (waiting.model not in due, -priority(waiting.model), waiting.turn)
        return sorted(self.requests.items(), key=key)
