"""The reasons the scheduler gives its stops, as data, and the gateway's bounded event log of them."""

from __future__ import annotations

from berth.gateway.events import EventKind, EventLog, describe_stop, stop_facts
from berth.scheduler import (
    Eviction, GroupPolicy, MatrixPolicy, MemoryPolicy, ModelPolicy, Scheduler, Stop, StopReason, StopWhy,
)
from tests.unit.test_scheduler_memory import GROUP, GiB, ready, shared


def test_an_eviction_says_for_whom_what_it_needs_where_how_long_the_victim_idled_and_by_which_rule():
    s = shared({"a": 4, "b": 4, "c": 6})
    ready(s, "a", 1, 0)
    ready(s, "b", 2, 1)
    s.request(3, "a", 2)
    s.finished(3, 3)
    [stop] = s.request(4, "c", 43)
    assert stop == Stop("b", StopReason.MEMORY)
    assert stop.why == StopWhy(for_model="c", need={"host": 6 * GiB}, short={"host": 4 * GiB}, idle_s=42.0,
                               rule="lru", freed={"host": 4 * GiB})
    assert describe_stop("b", stop.reason, stop.why) == (
        "evicted for c: needs 6.0 GiB on host (4.0 GiB short), b idle 42 s, least recently used")


def test_the_largest_rule_is_named_when_it_chose():
    s = shared({"a": 2, "b": 5, "c": 6}, eviction="largest")
    ready(s, "a", 1, 0)
    ready(s, "b", 2, 0)
    [stop] = s.request(3, "c", 1)
    assert (stop.model, stop.why.rule, stop.why.for_model) == ("b", Eviction.LARGEST.value, "c")


def test_a_model_of_unknown_size_is_evicted_because_it_runs_alone():
    s = shared({"a": None, "b": 2})
    ready(s, "a", 1, 0)
    [stop] = s.request(2, "b", 5)
    assert (stop.model, stop.reason, stop.why.rule, stop.why.idle_s) == ("a", StopReason.MEMORY, "unknown size", 5.0)


def test_a_swap_names_the_model_it_makes_way_for_and_whether_groups_or_the_matrix_decided():
    models = {"a": ModelPolicy("g"), "b": ModelPolicy("g")}
    s = Scheduler.build(models, {"g": GroupPolicy()})
    ready(s, "a", 1, 0)
    [stop] = s.request(2, "b", 7)
    assert stop.why == StopWhy(for_model="b", idle_s=7.0, rule="group", freed={})
    assert describe_stop("a", stop.reason, stop.why) == "swapped out for b: its group swaps, a idle 7 s"
    matrix = Scheduler.build(models, {"g": GroupPolicy()}, matrix=MatrixPolicy((frozenset({"a"}), frozenset({"b"}))))
    ready(matrix, "a", 1, 0)
    [stop] = matrix.request(2, "b", 3)
    assert (stop.why.for_model, stop.why.rule) == ("b", "matrix")


def test_ttl_and_unload_stops_carry_the_idle_time_and_what_they_free():
    s = Scheduler.build({"a": ModelPolicy(GROUP, ttl=10, memory={"host": GiB})},
                        {GROUP: GroupPolicy(swap=False, exclusive=False)}, MemoryPolicy({"host": 4 * GiB}, GROUP))
    ready(s, "a", 1, 0)
    [stop] = s.tick(12)
    assert stop == Stop("a", StopReason.TTL)
    assert stop.why == StopWhy(idle_s=12.0, rule="ttl", freed={"host": GiB})
    assert describe_stop("a", stop.reason, stop.why) == "TTL: a idle 12 s"
    s.stopped("a", 13)
    ready(s, "a", 2, 20)
    [stop] = s.unload("a", 25)
    assert (stop.reason, stop.why.idle_s) == (StopReason.UNLOAD, 5.0)


def test_a_busy_victim_stops_when_its_request_ends_and_then_says_so():
    s = shared({"a": 6, "b": 6})
    ready(s, "a", 1, 0, finish=False)
    assert s.request(2, "b", 1) == []  # a drains first
    [stop] = s.finished(1, 4)
    assert (stop.model, stop.why.for_model, stop.why.idle_s) == ("a", "b", 0.0)


def test_the_event_log_numbers_events_keeps_the_newest_and_says_how_many_a_reader_missed():
    log = EventLog(keep=3)
    for model in "abcde":
        log.record(model, EventKind.START)
    events, dropped = log.since(0)
    assert [e.seq for e in events] == [3, 4, 5] and dropped == 2
    events, dropped = log.since(3)
    assert [e.model for e in events] == ["d", "e"] and dropped == 0
    assert log.since(5) == ([], 0) and log.last_seq() == 5


def test_a_stop_is_logged_with_its_facts_as_json_and_its_sentence():
    log = EventLog()
    why = StopWhy(for_model="c", need={"host": 2 * GiB}, idle_s=40.04, rule="lru", freed={"host": GiB})
    event = log.stop("b", StopReason.MEMORY, why)
    assert event.as_json()["why"] == {"for_model": "c", "need_bytes": {"host": 2 * GiB}, "idle_s": 40.0,
                                      "rule": "lru", "freed_bytes": {"host": GiB}}
    assert event.as_json()["reason"] == "memory" and event.kind is EventKind.STOP
    assert event.text == "evicted for c: needs 2.0 GiB on host, b idle 40 s, least recently used"
    assert stop_facts(StopWhy()) == {}
