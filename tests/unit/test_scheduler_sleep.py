"""Sleeping models and `return_to` in the pure scheduler."""

from __future__ import annotations

from berth.core.errors import ModelUnloaded
from berth.scheduler import (
    Admit, Eviction, GroupPolicy, MemoryPolicy, ModelPolicy, ModelState, Reject, Scheduler, Start, Stop, Wake,
)

GiB = 1024**3
GROUP = "(default)"


def shared(sizes: dict[str, int], budget: int = 10, ttl: dict[str, float] | None = None,
           return_to: dict[str, str] | None = None) -> Scheduler:
    return Scheduler.build({m: ModelPolicy(GROUP, ttl=(ttl or {}).get(m, 0), memory={"host": size * GiB},
                                           return_to=(return_to or {}).get(m)) for m, size in sizes.items()},
                           {GROUP: GroupPolicy(swap=False, exclusive=False)},
                           MemoryPolicy({"host": budget * GiB}, GROUP, Eviction.LRU))


def used(s: Scheduler, model: str, request_id: int, now: float) -> None:
    """`model` starts (or was ready), serves `request_id` and goes idle."""
    actions = s.request(request_id, model, now)
    if actions != [Admit(request_id, model)]:
        assert actions == [Start(model)]
        assert s.started(model, now) == [Admit(request_id, model)]
    s.finished(request_id, now)


def asleep(s: Scheduler, model: str, now: float, keeps: int) -> None:
    s.slept(model, now, now)
    assert s.state(model) is ModelState.SLEEPING
    s.set_sleeping_memory(model, {"host": keeps * GiB}, now)


def test_a_sleeping_models_memory_goes_to_another_and_it_wakes_by_evicting_an_idle_one():
    s = shared({"a": 6, "b": 6})
    used(s, "a", 1, 0)
    asleep(s, "a", 5, keeps=1)
    assert s.request(2, "b", 6) == [Start("b")]  # 1 + 6 fit in 10: a's process stays
    assert s.state("a") is ModelState.SLEEPING
    assert s.started("b", 7) == [Admit(2, "b")]
    s.finished(2, 8)
    assert s.request(3, "a", 9) == [Stop("b", "memory")]  # waking a needs 5 more: idle b goes
    assert s.stopped("b", 10) == [Wake("a")]  # the same process wakes: not a second start
    assert s.state("a") is ModelState.STARTING
    assert s.started("a", 11) == [Admit(3, "a")]


def test_many_requests_for_a_sleeping_model_share_one_wake():
    s = shared({"a": 6})
    used(s, "a", 1, 0)
    asleep(s, "a", 5, keeps=1)
    actions = [a for i in range(2, 7) for a in s.request(i, "a", 6)]
    assert actions == [Wake("a")]
    assert s.started("a", 7) == [Admit(i, "a") for i in range(2, 7)]


def test_until_measured_a_sleeping_model_counts_its_whole_plan():
    s = shared({"a": 6, "b": 6})
    used(s, "a", 1, 0)
    s.slept("a", 5, 5)
    assert s.request(2, "b", 6) == [Stop("a", "memory")]  # what it keeps is not known yet


def test_a_sleep_seen_before_the_last_request_ended_is_ignored():
    s = shared({"a": 6})
    used(s, "a", 1, 0)
    s.request(2, "a", 4)
    assert s.slept("a", 4.5, 4.6) == [] and s.state("a") is ModelState.READY  # busy: the request wakes it
    s.finished(2, 5)
    assert s.slept("a", 4.5, 5.1) == [] and s.state("a") is ModelState.READY  # seen before request 2 ended
    assert s.slept("a", 5.5, 5.6) == [] and s.state("a") is ModelState.SLEEPING


def test_ttl_still_stops_a_sleeping_model_and_counts_from_its_last_request():
    s = shared({"a": 6}, ttl={"a": 60})
    used(s, "a", 1, 0)
    asleep(s, "a", 5, keeps=1)
    assert s.next_deadline() == 60
    assert s.tick(60) == [Stop("a", "ttl")]


def test_unload_and_shutdown_stop_a_sleeping_model():
    s = shared({"a": 4, "b": 4})
    used(s, "a", 1, 0)
    used(s, "b", 2, 0)
    asleep(s, "a", 5, keeps=1)
    assert s.unload("a", 6) == [Stop("a", "unload")]
    asleep(s, "b", 7, keeps=1)
    assert s.shutdown(8) == [Stop("b", "shutdown")]


def test_a_sleeping_member_of_a_swap_group_is_stopped_for_another_member():
    s = Scheduler.build({m: ModelPolicy("g") for m in "ab"}, {"g": GroupPolicy(swap=True, exclusive=True)})
    used(s, "a", 1, 0)
    s.slept("a", 5, 5)
    assert s.request(2, "b", 6) == [Stop("a", "swap")]  # llama-swap's one member at a time, asleep or not
    assert s.stopped("a", 7) == [Start("b")]


def test_a_wake_that_kills_the_process_starts_the_model_again():
    s = shared({"a": 6})
    used(s, "a", 1, 0)
    asleep(s, "a", 5, keeps=1)
    assert s.request(2, "a", 6) == [Wake("a")]
    assert s.stopped("a", 7) == [Start("a")]  # the waiting request is not lost


def test_a_sleeping_model_that_woke_by_itself_counts_its_whole_plan_again():
    s = shared({"a": 6, "b": 6})
    used(s, "a", 1, 0)
    asleep(s, "a", 5, keeps=1)
    assert s.started("a", 6) == []
    assert s.state("a") is ModelState.READY
    assert s.request(2, "b", 7) == [Stop("a", "memory")]


# -- return_to ----------------------------------------------------------------------------------


def test_after_a_ttl_stop_the_baseline_model_starts_again_when_nothing_waits():
    s = shared({"daily": 4, "big": 9}, ttl={"big": 60}, return_to={"big": "daily"})
    used(s, "daily", 1, 0)
    assert s.request(2, "big", 1) == [Stop("daily", "memory")]
    s.stopped("daily", 2)
    s.started("big", 3)
    s.finished(2, 4)
    assert s.tick(64) == [Stop("big", "ttl")]
    assert s.stopped("big", 65) == [Start("daily")]
    assert s.started("daily", 66) == []  # ready and idle, for the next request


def test_no_return_when_requests_wait_or_the_stop_was_not_a_ttl():
    s = shared({"daily": 4, "big": 9, "other": 9}, ttl={"big": 60}, return_to={"big": "daily"})
    used(s, "big", 1, 0)
    s.tick(60)
    s.request(2, "other", 60.5)
    assert s.stopped("big", 61) == [Start("other")]  # the waiting request's model, not the baseline
    s2 = shared({"daily": 4, "big": 9}, ttl={"big": 60}, return_to={"big": "daily"})
    used(s2, "big", 1, 0)
    assert s2.unload("big", 5) == [Stop("big", "unload")]
    assert s2.stopped("big", 6) == []


def test_no_return_that_would_stop_another_model():
    s = shared({"daily": 4, "big": 3, "mid": 7}, ttl={"big": 60}, return_to={"big": "daily"})
    used(s, "big", 1, 0)
    used(s, "mid", 2, 30)
    s.tick(60)
    assert s.stopped("big", 61) == []  # daily would need mid's memory: mid stays, daily waits for a request
    assert s.state("mid") is ModelState.READY and s.state("daily") is ModelState.STOPPED


def test_a_baseline_that_is_backing_off_is_not_returned_to():
    from berth.core.errors import StartFailed

    s = shared({"daily": 4, "big": 5}, ttl={"big": 60}, return_to={"big": "daily"})
    used(s, "big", 9, 0)
    for t in (58, 59):  # two failures in a row: no start before 61
        s.request(t, "daily", t)
        s.start_failed("daily", StartFailed("daily", "boom"), t)
    s.tick(60)
    assert s.stopped("big", 60.5) == []
    assert s.state("daily") is ModelState.FAILED


def test_unload_rejects_waiters_of_a_sleeping_model_that_was_waking():
    s = shared({"a": 6})
    used(s, "a", 1, 0)
    asleep(s, "a", 5, keeps=1)
    s.request(2, "a", 6)
    assert s.unload("a", 7) == [Stop("a", "unload")]
    [reject] = s.stopped("a", 8)
    assert isinstance(reject, Reject) and isinstance(reject.error, ModelUnloaded)


def test_random_sequences_with_sleep_and_return_keep_memory_within_budget():
    """Sleeps, wakes, TTL stops and returns among models sharing 10 GiB: the memory live processes hold
    (a sleeping one what it keeps) never exceeds the budget (RandomWalk checks the rest)."""
    import random

    from berth.scheduler import QueuePolicy
    from tests.support.scheduling import RandomWalk

    for seed in range(30):
        rng = random.Random(seed)
        sizes = {"a": 4, "b": 5, "c": 6}
        s = Scheduler.build({m: ModelPolicy(GROUP, ttl=rng.choice([0, 3, 8]), concurrency_limit=1000,
                                            memory={"host": size * GiB}, return_to="a" if m != "a" else None)
                             for m, size in sizes.items()},
                            {GROUP: GroupPolicy(swap=False, exclusive=False)},
                            MemoryPolicy({"host": 10 * GiB}, GROUP, Eviction.LRU),
                            queue=QueuePolicy(max_wait=rng.uniform(0, 4), min_residency=rng.uniform(0, 2)))
        walk = RandomWalk(s, "abc", rng)

        def sleep_one(now: float) -> list:
            model = rng.choice("abc")
            actions = s.slept(model, now - rng.random(), now)
            if s.state(model) is ModelState.SLEEPING and rng.random() < 0.7:
                actions += s.set_sleeping_memory(model, {"host": GiB // 2}, now)
            return actions

        for _ in range(400):
            walk.step(sleep_one)
            held = sum(s.held(m).get("host", 0) for m in s.running())
            assert held <= 10 * GiB, f"seed {seed}: {held / GiB:.1f} GiB held by {s.running()}"
