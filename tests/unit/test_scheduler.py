"""The pure scheduler, driven event by event: no processes, ports or sleeps."""

from __future__ import annotations

import pytest

from berth.core.errors import ModelUnloaded, ShuttingDown, StartFailed, TooManyRequests
from berth.scheduler import Admit, GroupPolicy, ModelPolicy, ModelState, Reject, Scheduler, Start, Stop


def one_swap_group(*models: str, ttl: float = 0, limit: int = 10) -> Scheduler:
    return Scheduler.build({m: ModelPolicy("g", ttl=ttl, concurrency_limit=limit) for m in models},
                           {"g": GroupPolicy(swap=True, exclusive=True)})


def test_first_request_starts_model_and_is_admitted_when_ready():
    s = one_swap_group("a")
    assert s.request(1, "a", 0) == [Start("a")]
    assert s.state("a") is ModelState.STARTING
    assert s.started("a", 1) == [Admit(1, "a")]
    assert s.state("a") is ModelState.READY


def test_twenty_requests_for_a_loading_model_share_one_start():
    s = one_swap_group("a", limit=100)
    actions = [a for i in range(20) for a in s.request(i, "a", 0)]
    assert actions == [Start("a")]
    assert s.started("a", 1) == [Admit(i, "a") for i in range(20)]


def test_start_failure_rejects_every_waiter_with_the_same_error_and_next_request_retries():
    s = one_swap_group("a")
    s.request(1, "a", 0)
    s.request(2, "a", 0)
    error = StartFailed("a", "boom")
    assert s.start_failed("a", error, 1) == [Reject(1, "a", error), Reject(2, "a", error)]
    assert s.state("a") is ModelState.FAILED
    assert s.request(3, "a", 2) == [Start("a")]


def test_a_model_that_fails_twice_in_a_row_backs_off_exponentially_and_success_resets_it():
    from berth.core.errors import StartBackedOff
    from berth.scheduler.core import BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS

    s = one_swap_group("a")
    error = StartFailed("a", "boom")
    s.request(1, "a", 0)
    s.start_failed("a", error, 1)
    assert s.request(2, "a", 1) == [Start("a")]  # one failure: the next request tries at once
    s.start_failed("a", error, 2)
    refused = s.request(3, "a", 2.5)  # two in a row: refused without a start
    assert len(refused) == 1 and isinstance(refused[0], Reject) and isinstance(refused[0].error, StartBackedOff)
    assert refused[0].error.retry_after == 2 and "failed to start 2 times" in refused[0].error.message
    assert s.view("a").start_failures == 2 and s.view("a").retry_at == 2 + BACKOFF_FIRST_SECONDS
    assert s.request(4, "a", 2 + BACKOFF_FIRST_SECONDS) == [Start("a")]  # the back-off is over
    s.start_failed("a", error, 10)
    assert s.view("a").retry_at == 10 + 2 * BACKOFF_FIRST_SECONDS  # doubled
    for attempt in range(10):
        s.request(100 + attempt, "a", 1000 * (attempt + 1))
        s.start_failed("a", error, 1000 * (attempt + 1))
    assert s.view("a").retry_at == 10_000 + BACKOFF_MAX_SECONDS  # capped
    s.request(200, "a", 20_000)
    assert s.started("a", 20_001) == [Admit(200, "a")]
    assert s.view("a").start_failures == 0 and s.view("a").retry_at is None


def test_a_changed_definition_may_start_at_once_despite_a_back_off():
    s = one_swap_group("a")
    for t in (0, 1):
        s.request(t, "a", t)
        s.start_failed("a", StartFailed("a", "boom"), t)
    assert isinstance(s.request(5, "a", 1.5)[0], Reject)
    s.forgive("a")
    assert s.request(6, "a", 1.5) == [Start("a")]


def test_swap_waits_for_in_flight_requests_then_stops_then_starts():
    s = one_swap_group("a", "b")
    s.request(1, "a", 0)
    s.started("a", 0)
    assert s.request(2, "b", 1) == []  # a is busy: nothing is stopped
    assert s.state("a") is ModelState.READY
    assert s.finished(1, 2) == [Stop("a", "swap")]
    assert s.stopped("a", 3) == [Start("b")]
    assert s.started("b", 4) == [Admit(2, "b")]


def test_idle_model_is_stopped_at_once_for_a_swap():
    s = one_swap_group("a", "b")
    s.request(1, "a", 0)
    s.started("a", 0)
    s.finished(1, 1)
    assert s.request(2, "b", 2) == [Stop("a", "swap")]


def test_requests_for_a_draining_model_queue_behind_the_swap_in_arrival_order():
    s = one_swap_group("a", "b")
    s.request(1, "a", 0)
    s.started("a", 0)
    s.request(2, "b", 1)  # a must drain for b
    assert s.request(3, "a", 1) == []  # not admitted: would starve b
    assert s.finished(1, 2) == [Stop("a", "swap")]
    assert s.stopped("a", 3) == [Start("b")]
    assert s.started("b", 4) == [Admit(2, "b")]
    assert s.finished(2, 5) == [Stop("b", "swap")]
    assert s.stopped("b", 6) == [Start("a")]
    assert s.started("a", 7) == [Admit(3, "a")]


def test_queue_serves_swaps_in_arrival_order():
    s = one_swap_group("a", "b", "c")
    s.request(1, "a", 0)
    s.started("a", 0)
    s.request(2, "b", 1)
    s.request(3, "c", 1)
    s.finished(1, 2)
    assert s.stopped("a", 3) == [Start("b")]  # b asked first
    s.started("b", 4)
    assert s.finished(2, 5) == [Stop("b", "swap")]
    assert s.stopped("b", 6) == [Start("c")]


def test_ready_model_is_not_blocked_by_another_models_start():
    s = Scheduler.build({"a": ModelPolicy("g1"), "b": ModelPolicy("g2")},
                        {"g1": GroupPolicy(swap=True, exclusive=False), "g2": GroupPolicy(swap=True, exclusive=False)})
    s.request(1, "a", 0)
    s.started("a", 0)
    assert s.request(2, "b", 1) == [Start("b")]  # different non-exclusive groups run together
    assert s.request(3, "a", 1) == [Admit(3, "a")]  # while b loads


def test_cancelled_waiter_holds_nothing():
    s = one_swap_group("a", "b")
    s.request(1, "a", 0)
    s.started("a", 0)
    s.request(2, "b", 1)  # a now drains for b
    assert s.cancel(2, 1.5) == []
    assert s.view("b").queued == 0
    assert s.request(3, "a", 2) == [Admit(3, "a")]  # a no longer drains
    assert s.finished(1, 3) == []
    assert s.state("a") is ModelState.READY


def test_ttl_counts_from_end_of_last_request_and_never_fires_while_busy():
    s = one_swap_group("a", ttl=10)
    s.request(1, "a", 0)
    s.started("a", 0)
    assert s.next_deadline() is None  # busy
    assert s.tick(100) == []
    s.finished(1, 100)
    assert s.next_deadline() == 110
    assert s.tick(109.9) == []
    s.request(2, "a", 105)  # a request resets the countdown
    s.finished(2, 107)
    assert s.tick(110) == []
    assert s.tick(117) == [Stop("a", "ttl")]


def test_ttl_zero_never_unloads():
    s = one_swap_group("a", ttl=0)
    s.request(1, "a", 0)
    s.started("a", 0)
    s.finished(1, 1)
    assert s.next_deadline() is None
    assert s.tick(10**9) == []


def test_crash_while_ready_marks_stopped_and_next_request_starts_again():
    s = one_swap_group("a")
    s.request(1, "a", 0)
    s.started("a", 0)
    s.finished(1, 1)
    assert s.stopped("a", 2) == []
    assert s.state("a") is ModelState.STOPPED
    assert s.request(2, "a", 3) == [Start("a")]


def test_concurrency_limit_counts_in_flight_and_waiting():
    s = one_swap_group("a", limit=2)
    s.request(1, "a", 0)
    s.request(2, "a", 0)
    [reject] = s.request(3, "a", 0)
    assert isinstance(reject, Reject) and isinstance(reject.error, TooManyRequests)
    s.started("a", 1)
    s.finished(1, 2)
    assert s.request(4, "a", 2) == [Admit(4, "a")]


def test_unload_waits_for_in_flight_unless_forced():
    s = one_swap_group("a")
    s.request(1, "a", 0)
    s.started("a", 0)
    assert s.unload("a", 1) == []
    assert s.request(2, "a", 1) == []  # queued behind the unload
    assert s.finished(1, 2) == [Stop("a", "unload")]
    [reject] = s.stopped("a", 3)
    assert isinstance(reject.error, ModelUnloaded) and reject.request_id == 2
    s2 = one_swap_group("a")
    s2.request(1, "a", 0)
    s2.started("a", 0)
    assert s2.unload("a", 1, force=True) == [Stop("a", "unload")]


def test_unload_of_starting_model_stops_it_and_rejects_waiters():
    s = one_swap_group("a")
    s.request(1, "a", 0)
    assert s.unload("a", 1) == [Stop("a", "unload")]
    [reject] = s.stopped("a", 2)
    assert reject.request_id == 1 and isinstance(reject.error, ModelUnloaded)


def test_persistent_group_is_never_stopped_by_another_group():
    s = Scheduler.build({"p": ModelPolicy("pin"), "a": ModelPolicy("g"), "b": ModelPolicy("g")},
                        {"pin": GroupPolicy(swap=True, exclusive=False, persistent=True),
                         "g": GroupPolicy(swap=True, exclusive=True)})
    s.request(1, "p", 0)
    s.started("p", 0)
    s.finished(1, 0)
    assert s.request(2, "a", 1) == [Start("a")]  # exclusive, but p is persistent
    s.started("a", 2)
    s.finished(2, 2)
    assert s.request(3, "b", 3) == [Stop("a", "swap")]  # swap inside g; p untouched
    assert s.state("p") is ModelState.READY


def test_exclusive_group_stops_other_groups_and_non_swap_group_runs_members_together():
    s = Scheduler.build({"x": ModelPolicy("free"), "y": ModelPolicy("free"), "e": ModelPolicy("ex")},
                        {"free": GroupPolicy(swap=False, exclusive=False),
                         "ex": GroupPolicy(swap=True, exclusive=True)})
    s.request(1, "x", 0)
    s.request(2, "y", 0)
    assert s.started("x", 1) == [Admit(1, "x")]
    assert s.started("y", 1) == [Admit(2, "y")]  # both members of a swap:false group run
    s.finished(1, 2)
    s.finished(2, 2)
    assert sorted(s.request(3, "e", 3), key=str) == [Stop("x", "swap"), Stop("y", "swap")]
    assert s.stopped("x", 4) == []  # y still stopping
    assert s.stopped("y", 4) == [Start("e")]


def test_reconfigure_removes_running_model_after_its_requests():
    s = one_swap_group("a", "b")
    s.request(1, "a", 0)
    s.started("a", 0)
    s.configure({"b": ModelPolicy("g")}, {"g": GroupPolicy()})
    assert s.tick(1) == []  # still serving request 1
    assert s.finished(1, 2) == [Stop("a", "reload")]
    s.stopped("a", 3)
    assert "a" not in s.models


def test_shutdown_rejects_waiters_and_stops_everything():
    s = one_swap_group("a", "b")
    s.request(1, "a", 0)
    s.started("a", 0)
    s.request(2, "b", 1)
    actions = s.shutdown(2)
    assert Stop("a", "shutdown") in actions
    assert any(isinstance(a, Reject) and a.request_id == 2 and isinstance(a.error, ShuttingDown) for a in actions)
    [late] = s.request(3, "a", 3)
    assert isinstance(late.error, ShuttingDown)


@pytest.mark.parametrize("seed", range(30))
def test_random_event_sequences_keep_invariants(seed):
    """Random interleavings: never two starts, never a busy model stopped, never a start while a conflict runs."""
    import random

    from tests.support.scheduling import RandomWalk

    s = one_swap_group("a", "b", "c", ttl=5, limit=1000)
    walk = RandomWalk(s, "abc", random.Random(seed), one_at_a_time=True)
    for _ in range(300):
        walk.step()
