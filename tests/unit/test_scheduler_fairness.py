"""Fairness between clients (API keys) waiting for the same model, and the model server's slots (`parallel`):
the pure scheduler, event by event."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from berth.scheduler import Admit, Client, GroupPolicy, ModelPolicy, Scheduler, Start

A, B = Client("a"), Client("b")


def ready_model(parallel: int, limit: int = 100) -> Scheduler:
    s = Scheduler.build({"m": ModelPolicy("g", concurrency_limit=limit, parallel=parallel)}, {"g": GroupPolicy()})
    assert s.request(0, "m", 0) == [Start("m")]
    assert s.started("m", 0) == [Admit(0, "m")]
    s.finished(0, 0)
    return s


def admitted(actions) -> list[int]:
    return [a.request_id for a in actions if isinstance(a, Admit)]


def test_a_models_parallel_slots_cap_what_is_in_flight_and_the_rest_wait_in_turn():
    s = ready_model(parallel=2)
    assert admitted(s.request(1, "m", 1)) == [1]
    assert admitted(s.request(2, "m", 1)) == [2]
    assert admitted(s.request(3, "m", 1)) == []  # both slots busy: it waits here, not at the server
    assert s.view("m").in_flight == 2 and s.view("m").queued == 1
    assert admitted(s.finished(1, 2)) == [3]


def test_a_request_that_takes_no_slot_is_never_held_back_by_busy_slots():
    s = ready_model(parallel=1)
    s.request(1, "m", 1)
    assert admitted(s.request(2, "m", 1, uses_slot=False)) == [2]  # a /tokenize, say
    assert admitted(s.request(3, "m", 1)) == []
    assert admitted(s.finished(2, 2)) == []  # it held no slot, so none is freed
    assert admitted(s.finished(1, 2)) == [3]


def test_a_client_with_one_request_goes_before_another_clients_backlog():
    s = ready_model(parallel=1)
    for request_id in range(1, 6):
        s.request(request_id, "m", 1, client=A)  # 1 in flight, 2-5 wait
    s.request(10, "m", 2, client=B)
    order = []
    for _ in range(5):
        [next_id] = admitted(s.finished(order[-1] if order else 1, 3))
        order.append(next_id)
    assert order == [10, 2, 3, 4, 5]


def test_backlogged_clients_alternate_by_weight():
    s = ready_model(parallel=1)
    s.request(1, "m", 1, client=A)  # in flight
    for request_id in range(100, 106):
        s.request(request_id, "m", 1, client=A)
    for request_id in range(200, 206):
        s.request(request_id, "m", 1, client=Client("b", weight=2))
    order, last = [], 1
    for _ in range(9):
        [last] = admitted(s.finished(last, 2))
        order.append("a" if last < 200 else "b")
    assert order == ["b", "b", "a", "b", "b", "a", "b", "b", "a"]  # two of b's for each of a's


def test_without_clients_requests_are_served_in_arrival_order():
    s = ready_model(parallel=1)
    for request_id in range(1, 6):
        s.request(request_id, "m", 1)
    order, last = [], 1
    for _ in range(4):
        [last] = admitted(s.finished(last, 2))
        order.append(last)
    assert order == [2, 3, 4, 5]


def simulate(clients: dict[Client, int], parallel: int, finished_at: float) -> Iterator[tuple[Client, float, float]]:
    """Clients each keeping `concurrency` requests waiting or in flight (a new one as soon as one ends)
    against a model whose server takes `parallel` at a time, every request taking one unit of time.
    Yields (client, arrived, admitted) per admitted request, until `finished_at`."""
    s = ready_model(parallel, limit=1000)
    ids = iter(range(1, 1_000_000))
    client_of: dict[int, Client] = {}
    arrived: dict[int, float] = {}
    ends: list[tuple[float, int]] = []

    def handle(now: float, actions) -> Iterator[tuple[Client, float, float]]:
        for request_id in admitted(actions):
            heapq.heappush(ends, (now + 1.0, request_id))
            yield client_of[request_id], arrived[request_id], now

    def send(now: float, client: Client) -> Iterator[tuple[Client, float, float]]:
        request_id = next(ids)
        client_of[request_id], arrived[request_id] = client, now
        yield from handle(now, s.request(request_id, "m", now, client=client))

    for client, concurrency in clients.items():
        for _ in range(concurrency):
            yield from send(0.0, client)
    while ends and ends[0][0] < finished_at:
        now, request_id = heapq.heappop(ends)
        yield from handle(now, s.finished(request_id, now))
        yield from send(now, client_of[request_id])


def test_a_busy_key_does_not_starve_a_quiet_one_at_the_models_slots():
    """The scenario of issue 27: key A at concurrency 16 and key B at concurrency 1, one model whose server
    takes 4 at a time. Alone, each of B's requests is admitted at once; beside A, it waits only for the
    next slot to free (no A request that arrived before it goes first): B's wait stays within one service
    time, where arrival order would keep it behind A's twelve waiting requests."""
    alone = [admitted_at - arrived for client, arrived, admitted_at in simulate({B: 1}, 4, 50)]
    assert set(alone) == {0.0}
    shared = list(simulate({A: 16, B: 1}, 4, 200))
    b_waits = [admitted_at - arrived for client, arrived, admitted_at in shared if client == B]
    assert len(b_waits) > 50 and max(b_waits) <= 1.0
    assert sum(1 for client, _, _ in shared if client == A) > 3 * len(b_waits)  # A still gets the rest
    fifo = [admitted_at - arrived for client, arrived, admitted_at in simulate({Client(""): 16}, 4, 200)]
    assert min(fifo[16:]) == 3.0  # one client: arrival order, three rounds behind the twelve waiting


def test_turns_decide_among_one_models_requests_even_after_max_wait():
    """A backlog that has waited past max_wait (due, for swaps) does not jump a quieter key at its own
    model's slots."""
    from berth.scheduler import QueuePolicy

    s = Scheduler.build({"m": ModelPolicy("g", concurrency_limit=100, parallel=1)}, {"g": GroupPolicy()},
                        queue=QueuePolicy(max_wait=30, min_residency=10))
    s.request(0, "m", 0)
    s.started("m", 0)
    s.finished(0, 0)
    s.request(1, "m", 1, client=A)
    for request_id in range(2, 5):
        s.request(request_id, "m", 1, client=A)
    s.request(10, "m", 40, client=B)  # A's have waited 39 s by now, B's none
    assert admitted(s.finished(1, 41)) == [10]
