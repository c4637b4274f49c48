"""A client's keep_alive (Ollama's): the idle TTL of one run of a model, set at run time."""

from __future__ import annotations

import math

from berth.scheduler import Admit, GroupPolicy, ModelPolicy, ModelState, Scheduler, Start, Stop


def scheduler(ttl: float = 0) -> Scheduler:
    return Scheduler.build({m: ModelPolicy("g", ttl=ttl) for m in ("a", "b")},
                           {"g": GroupPolicy(swap=False, exclusive=False)})


def test_keep_alive_zero_before_the_first_request_stops_the_model_after_its_answer():
    s = scheduler(ttl=900)
    assert s.keep_alive("a", 0, 0) == []
    assert s.request(1, "a", 0) == [Start("a")]
    assert s.started("a", 1) == [Admit(1, "a")]  # admitted before any TTL is looked at
    assert s.finished(1, 2) == [Stop("a", "ttl")]


def test_keep_alive_zero_waits_for_every_request_in_flight():
    s = scheduler(ttl=900)
    s.request(1, "a", 0)
    s.started("a", 0)
    s.request(2, "a", 1)
    assert s.keep_alive("a", 0, 1) == []
    assert s.finished(1, 2) == []
    assert s.finished(2, 3) == [Stop("a", "ttl")]


def test_keep_alive_replaces_the_policy_ttl_for_this_run_only():
    s = scheduler(ttl=0)  # the policy: never unloaded
    s.request(1, "a", 0)
    s.started("a", 0)
    s.keep_alive("a", 5, 0)
    s.finished(1, 10)
    assert s.next_deadline() == 15
    assert s.view("a").ttl_deadline == 15
    assert s.tick(14) == []
    assert s.tick(15) == [Stop("a", "ttl")]
    s.stopped("a", 16)
    s.request(2, "a", 20)
    s.started("a", 21)
    s.finished(2, 22)
    assert s.next_deadline() is None  # the next run has the policy's TTL again


def test_keep_alive_forever_and_back_to_the_policy():
    s = scheduler(ttl=10)
    s.request(1, "a", 0)
    s.started("a", 0)
    s.keep_alive("a", math.inf, 0)
    s.finished(1, 1)
    assert s.next_deadline() is None and s.tick(5) == []
    assert s.keep_alive("a", None, 5) == []
    assert s.next_deadline() == 1 + 10
    assert s.keep_alive("a", None, 11) == [Stop("a", "ttl")]  # a TTL already past stops it at once


def test_keep_alive_set_while_the_model_stops_holds_for_its_next_run():
    s = scheduler(ttl=0)
    s.request(1, "a", 0)
    s.started("a", 0)
    s.finished(1, 1)
    s.unload("a", 2)
    assert s.state("a") is ModelState.STOPPING
    s.keep_alive("a", 3, 2)
    s.stopped("a", 3)
    s.request(2, "a", 4)
    s.started("a", 5)
    s.finished(2, 6)
    assert s.next_deadline() == 9


def test_a_crash_ends_the_keep_alive_of_the_run_that_died():
    s = scheduler(ttl=0)
    s.request(1, "a", 0)
    s.started("a", 0)
    s.keep_alive("a", 3, 0)
    s.finished(1, 1)
    s.stopped("a", 2)  # not asked for: the process died
    s.request(2, "a", 4)
    s.started("a", 5)
    s.finished(2, 6)
    assert s.next_deadline() is None


def test_keep_alive_of_an_unknown_model_changes_nothing():
    s = scheduler()
    assert s.keep_alive("nope", 0, 0) == []
