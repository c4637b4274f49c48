"""Memory-aware scheduling in the pure scheduler: planned bytes per device decide who runs together."""

from __future__ import annotations

import pytest

from berth.core.errors import InsufficientMemory, StartFailed
from berth.scheduler import (
    Admit, Eviction, GroupPolicy, MemoryPolicy, ModelPolicy, ModelState, Reject, Scheduler, Start, Stop,
)
from tests.support.scheduling import random_events

GiB = 1024**3
GROUP = "(default)"


def shared(sizes: dict[str, int | None], budget: int = 10, pinned: tuple[str, ...] = (), eviction: str = "lru",
           gpu: dict[str, int] | None = None) -> Scheduler:
    """Models sharing one memory-scheduled group; sizes in GiB on the host (None: unknown)."""
    models = {}
    for name, size in sizes.items():
        memory = None if size is None else {"host": size * GiB, **({"gpu0": gpu[name] * GiB} if gpu and name in gpu
                                                                     else {})}
        models[name] = ModelPolicy(GROUP, concurrency_limit=100, memory=memory, pinned=name in pinned)
    budgets = {"host": budget * GiB, "gpu0": 8 * GiB}
    return Scheduler.build(models, {GROUP: GroupPolicy(swap=False, exclusive=False)},
                           MemoryPolicy(budgets, GROUP, Eviction(eviction)))


def ready(s: Scheduler, model: str, request_id: int, now: float, finish: bool = True) -> None:
    assert s.request(request_id, model, now) == [Start(model)]
    assert s.started(model, now) == [Admit(request_id, model)]
    if finish:
        s.finished(request_id, now)


def test_models_that_fit_together_run_together():
    s = shared({"a": 4, "b": 4})
    ready(s, "a", 1, 0)
    ready(s, "b", 2, 1)
    assert s.state("a") is ModelState.READY and s.state("b") is ModelState.READY


def test_least_recently_used_idle_model_is_evicted_and_the_start_waits_for_its_exit():
    s = shared({"a": 4, "b": 4, "c": 6})
    ready(s, "a", 1, 0)
    ready(s, "b", 2, 1)
    s.request(3, "a", 2)  # a is used again after b: b is now the least recently used
    s.finished(3, 3)
    assert s.request(4, "c", 4) == [Stop("b", "memory")]
    assert s.tick(5) == []  # b still holds its memory while stopping
    assert s.stopped("b", 6) == [Start("c")]
    assert s.state("a") is ModelState.READY


def test_larger_idle_model_goes_first_on_equal_age():
    s = shared({"a": 2, "b": 5, "c": 6})
    ready(s, "a", 1, 0)
    ready(s, "b", 2, 0)
    assert s.request(3, "c", 1) == [Stop("b", "memory")]


def test_largest_first_policy_evicts_the_bigger_model_even_if_used_recently():
    s = shared({"a": 2, "b": 5, "c": 6}, eviction="largest")
    ready(s, "b", 1, 0)
    ready(s, "a", 2, 1)
    assert s.request(3, "c", 2) == [Stop("b", "memory")]


def test_only_as_many_models_as_needed_are_evicted():
    s = shared({"a": 3, "b": 3, "c": 3, "d": 3})
    for i, m in enumerate("abc"):
        ready(s, m, i, i)
    assert s.request(9, "d", 5) == [Stop("a", "memory")]
    assert s.state("b") is ModelState.READY and s.state("c") is ModelState.READY


def test_busy_model_is_never_stopped_idle_one_goes_instead():
    s = shared({"a": 4, "b": 4, "c": 6})
    ready(s, "a", 1, 0, finish=False)  # a is busy and the least recently used
    ready(s, "b", 2, 1)
    assert s.request(3, "c", 2) == [Stop("b", "memory")]
    assert s.state("a") is ModelState.READY


def test_when_only_a_busy_model_can_make_room_the_start_waits_for_its_requests():
    s = shared({"a": 8, "c": 6})
    ready(s, "a", 1, 0, finish=False)
    assert s.request(2, "c", 1) == []
    assert s.request(3, "a", 2) == []  # a drains for the earlier request: no new admissions
    assert s.finished(1, 3) == [Stop("a", "memory")]
    assert s.stopped("a", 4) == [Start("c")]


def test_pinned_model_is_never_evicted_and_a_model_that_cannot_fit_beside_it_is_refused_at_once():
    s = shared({"p": 6, "c": 6}, pinned=("p",))
    ready(s, "p", 1, 0)
    [reject] = s.request(2, "c", 1)
    assert isinstance(reject, Reject) and isinstance(reject.error, InsufficientMemory)
    assert reject.error.status == 507
    assert "pinned models p" in reject.error.message
    assert s.state("p") is ModelState.READY


def test_model_larger_than_the_budget_is_refused_at_once_with_the_plan():
    s = shared({"a": 2, "huge": 12})
    ready(s, "a", 1, 0)
    [reject] = s.request(2, "huge", 1)
    assert isinstance(reject.error, InsufficientMemory)
    assert "host: needs 12.0 GiB, at most 10.0 GiB can be freed" in reject.error.message
    assert s.state("a") is ModelState.READY  # nothing was evicted for a hopeless start


def test_gpu_need_counts_separately_from_host():
    s = shared({"a": 1, "b": 1}, gpu={"a": 5, "b": 5})
    ready(s, "a", 1, 0)
    assert s.request(2, "b", 1) == [Stop("a", "memory")]  # host has room; the GPU does not


def test_model_of_unknown_size_runs_alone():
    s = shared({"a": 2, "mystery": None})
    ready(s, "a", 1, 0)
    assert s.request(2, "mystery", 1) == [Stop("a", "memory")]
    assert s.stopped("a", 2) == [Start("mystery")]


def test_measured_memory_replaces_the_plan_for_later_decisions():
    s = shared({"a": 6, "b": 6})
    ready(s, "a", 1, 0)
    s.set_memory("a", {"host": 3 * GiB}, 1)  # it really uses less than planned
    assert s.request(2, "b", 2) == [Start("b")]


def test_out_of_memory_start_is_retried_once_after_evicting_idle_models():
    s = shared({"a": 2, "b": 4})
    ready(s, "a", 1, 0)
    assert s.request(2, "b", 1) == [Start("b")]
    oom = StartFailed("b", "cudaMalloc failed: out of memory", out_of_memory=True)
    assert s.start_failed("b", oom, 2) == [Stop("a", "memory")]
    assert s.stopped("a", 3) == [Start("b")]
    assert s.start_failed("b", oom, 4) == [Reject(2, "b", oom)]  # the second one is final
    assert s.state("b") is ModelState.FAILED


def test_later_request_cannot_take_the_room_an_earlier_one_waits_for():
    s = shared({"a": 6, "b": 6, "small": 3})
    ready(s, "a", 1, 0)
    assert s.request(2, "b", 1) == [Stop("a", "memory")]
    assert s.request(3, "small", 2) == []  # 4 GiB are free now, but b holds its claim on them
    actions = s.stopped("a", 3)
    assert actions[0] == Start("b")


@pytest.mark.parametrize("seed", range(30))
def test_random_event_sequences_never_plan_beyond_the_budget(seed):
    """Also: the model of unknown size `u` is never live beside another unpinned model."""
    sizes = {"a": 3, "b": 4, "c": 5, "d": 2, "u": None}
    s = shared(sizes, budget=9, pinned=("d",))
    for actions, admitted in random_events(s, list("abcdu"), seed, 300):
        for action in actions:
            if isinstance(action, Stop):
                assert action.model not in admitted.values(), "stopped a model with requests in flight"
                assert action.model != "d", "evicted a pinned model"
        live = [m for m in sizes if s.state(m) in (ModelState.STARTING, ModelState.READY, ModelState.STOPPING)]
        assert sum(sizes[m] or 0 for m in live) <= 9, f"planned beyond the budget: {live}"
        assert "u" not in live or set(live) <= {"u", "d"}, f"the unknown-size model shares: {live}"


def test_a_model_of_unknown_size_is_evicted_before_a_known_one_starts_beside_it():
    s = shared({"mystery": None, "a": 2, "b": 2})
    ready(s, "a", 1, 0)
    assert s.request(2, "mystery", 1) == [Stop("a", "memory")]  # it runs alone
    assert s.stopped("a", 2) == [Start("mystery")]
    s.started("mystery", 2)
    s.finished(2, 2)
    assert s.request(3, "b", 3) == [Stop("mystery", "memory")]  # 2 GiB would fit, but not beside the unknown
    assert s.stopped("mystery", 4) == [Start("b")]
