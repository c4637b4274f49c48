"""llama-swap's routing section: groups in their current place, the matrix (its set language and its
solver, table-driven from llama-swap's documented examples), fifo priorities, and selectors' strategies."""

from __future__ import annotations

import textwrap

import pytest

from berth.config import SelectorSpec, parse_config
from berth.config.matrix import MatrixSyntaxError, expand
from berth.core.errors import ConfigError
from berth.gateway.naming import choose
from berth.scheduler import Admit, MatrixPolicy, ModelPolicy, ModelState, Scheduler, Start, Stop

# llama-swap's documented expansions (config.example.yaml, routing.router.settings.matrix.sets)
EXPANSIONS = [
    ("model-a", [{"model-a"}]),
    ("a & b", [{"a", "b"}]),
    ("a | b", [{"a"}, {"b"}]),
    ("(a | b) & c", [{"a", "c"}, {"b", "c"}]),
    ("(a | b) & (c | d)", [{"a", "c"}, {"a", "d"}, {"b", "c"}, {"b", "d"}]),
    ("+llms & v", [{"a", "v"}, {"b", "v"}]),
    ("a & b | c", [{"a", "b"}, {"c"}]),  # & binds tighter than |
    ("a | a", [{"a"}]),
]


@pytest.mark.parametrize(("expression", "sets"), EXPANSIONS)
def test_set_expressions_expand_as_documented(expression, sets):
    refs = {"llms": [frozenset({"a"}), frozenset({"b"})]}
    assert expand(expression, lambda n: n, refs.__getitem__) == [frozenset(s) for s in sets]


@pytest.mark.parametrize("expression", ["", "a &", "(a | b", "a b", "| a", "+", "a)"])
def test_malformed_expressions_are_refused(expression):
    with pytest.raises(MatrixSyntaxError):
        expand(expression, lambda n: n, lambda ref: [])


MODELS = "".join(f"  {m}: {{cmd: 'x --port ${{PORT}}'}}\n" for m in (
    "gemma-model", "qwen-model", "mistral-model", "voxtral-model", "reranker-model", "llama-70B",
    "stable-diffusion"))

MATRIX = f"""\
models:
{MODELS}routing:
  router:
    use: matrix
    settings:
      matrix:
        vars: {{g: gemma-model, q: qwen-model, m: mistral-model, v: voxtral-model, e: reranker-model}}
        evict_costs: {{v: 50, llama-70B: 30}}
        sets:
          standard: "(g | qwen-model | m) & v"
          with_rerank: "(g | q) & v & e"
          creative: "(g | q) & stable-diffusion"
          full: "llama-70B"
  scheduler:
    use: fifo
    settings:
      fifo:
        priority: {{llama-70B: 10}}
"""


def test_llama_swaps_documented_matrix_loads_expanded():
    config = parse_config(MATRIX)
    assert config.warnings == [] and config.matrix is not None
    assert config.matrix.sets == tuple(frozenset(s) for s in (
        {"gemma-model", "voxtral-model"}, {"qwen-model", "voxtral-model"}, {"mistral-model", "voxtral-model"},
        {"gemma-model", "voxtral-model", "reranker-model"}, {"qwen-model", "voxtral-model", "reranker-model"},
        {"gemma-model", "stable-diffusion"}, {"qwen-model", "stable-diffusion"}, {"llama-70B"}))
    assert config.matrix.evict_costs == {"voxtral-model": 50, "llama-70B": 30}
    assert config.models["llama-70B"].priority == 10 and config.models["gemma-model"].priority == 0
    assert not config.memory.scheduled  # the matrix rules; memory only refuses what cannot fit


@pytest.mark.parametrize(("change", "message"), [
    ("standard: \"(g | nope) & v\"", "'nope' is neither a var nor a model id"),
    ("standard: \"+missing & v\"", "+missing names no set"),
    ("standard: \"+loop & v\"\n          loop: \"+standard\"", "cycle"),
    ("standard: \"g &\"", "ends too early"),
])
def test_matrix_mistakes_name_the_set_and_the_problem(change, message):
    text = MATRIX.replace('standard: "(g | qwen-model | m) & v"', change)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "m.yaml")
    assert message in str(caught.value) and "routing.router.settings.matrix.sets" in str(caught.value)


def test_one_routing_style_and_one_engine():
    groups = "groups: {a: {members: [gemma-model]}}\n"
    with pytest.raises(ConfigError, match="at the top level and routing.router too"):
        parse_config(MATRIX + groups)
    with pytest.raises(ConfigError, match="cannot use both groups and a matrix"):
        parse_config(f"models:\n{MODELS}{groups}matrix: {{sets: {{s: gemma-model}}}}\n")
    # under routing.router, `use` picks one engine and the other's settings wait unused (llama-swap's rule)
    both = MATRIX.replace("    use: matrix\n", "    use: group\n").replace(
        "      matrix:\n", "      groups: {g: {members: [gemma-model, qwen-model], swap: false}}\n      matrix:\n")
    config = parse_config(both)
    assert config.matrix is None and config.models["gemma-model"].group == "g"
    with pytest.raises(ConfigError, match="use: matrix needs"):
        parse_config(f"models:\n{MODELS}routing: {{router: {{use: matrix}}}}\n")
    dangling = parse_config(MATRIX.replace("{llama-70B: 10}", "{nope: 1}"), "p.yaml")
    assert dangling.warnings == ["p.yaml:25: routing.scheduler.settings.fifo.priority.nope: no model 'nope' is "
                                 "defined under models:; its priority is left out"]


def test_groups_in_their_current_place_mean_what_the_legacy_groups_mean():
    current = parse_config(textwrap.dedent("""\
        models:
          a: {cmd: "x --port ${PORT}"}
          b: {cmd: "x --port ${PORT}"}
        routing:
          router:
            use: group
            settings:
              groups:
                together: {swap: false, exclusive: false, members: [a, b]}
        """))
    legacy = parse_config(textwrap.dedent("""\
        models:
          a: {cmd: "x --port ${PORT}"}
          b: {cmd: "x --port ${PORT}"}
        groups:
          together: {swap: false, exclusive: false, members: [a, b]}
        """))
    assert current.warnings == [] and current.groups == legacy.groups
    assert current.models["a"].group == "together" and not current.memory.scheduled


def scheduler(matrix: MatrixPolicy, priorities: dict[str, int] | None = None) -> Scheduler:
    models = {m: ModelPolicy("g", priority=(priorities or {}).get(m, 0)) for m in "gqmveLs"}
    return Scheduler.build(models, {}, None, matrix)


def run(s: Scheduler, *models: str) -> None:
    """Start each model in turn and let it become ready (stopping what it displaced)."""
    for i, model in enumerate(models):
        actions = s.request(100 + i, model, 0.0)
        for action in actions:
            if isinstance(action, Stop):
                actions += s.stopped(action.model, 0.0)
        assert any(isinstance(a, Start) and a.model == model for a in actions), actions
        s.started(model, 0.0)
        s.finished(100 + i, 0.0)


SETS = MatrixPolicy(tuple(frozenset(x) for x in ("gv", "qv", "mv", "gve", "qve", "gs", "qs", "L")),
                    {"v": 50, "L": 30})


@pytest.mark.parametrize(("running", "request_for", "evicted"), [
    ("gv", "e", ""),  # [g,v,e] holds all three: nothing to stop
    ("gv", "q", "g"),  # [q,v] keeps the costly v
    ("gve", "m", "ge"),  # only [m,v] has m
    ("gs", "v", "s"),  # [g,v] keeps g; s goes
    ("qv", "L", "qv"),  # L runs alone
    ("L", "g", "L"),
    ("gv", "s", "v"),  # [g,s] costs v (50), [q,s] costs g and v (51): the cheaper wins
])
def test_the_solver_evicts_the_cheapest_way(running, request_for, evicted):
    s = scheduler(SETS)
    run(s, *running)
    actions = s.request(1, request_for, 0.0)
    assert sorted(a.model for a in actions if isinstance(a, Stop)) == sorted(evicted)


def test_ties_go_to_the_set_defined_first():
    s = scheduler(MatrixPolicy((frozenset("gq"), frozenset("gm"), frozenset("qm"))))
    run(s, "q", "m")  # [q,m] holds both
    # for g, [g,q] costs m (1) and [g,m] costs q (1): the first set wins, so m is stopped
    assert [a.model for a in s.request(3, "g", 0.0) if isinstance(a, Stop)] == ["m"]


def test_a_model_in_no_set_runs_alone():
    s = scheduler(MatrixPolicy((frozenset("gv"),)))
    run(s, "g", "v")
    assert sorted(a.model for a in s.request(1, "m", 0.0) if isinstance(a, Stop)) == ["g", "v"]


def test_higher_priority_waiting_requests_are_served_first():
    s = scheduler(MatrixPolicy(()), {"L": 10})  # no sets: every model runs alone
    run(s, "g")
    s.request(1, "g", 0.0)  # in flight on g: nothing can start until it ends
    s.request(2, "q", 0.0)
    s.request(3, "L", 0.0)  # arrived after q, with a higher priority
    actions = s.finished(1, 0.0)
    assert [a.model for a in actions if isinstance(a, Stop)] == ["g"]
    assert [a.model for a in s.stopped("g", 0.0) if isinstance(a, Start)] == ["L"]  # not q, which came first
    assert s.started("L", 0.0) == [Admit(3, "L")]


R, S, X, O = ModelState.READY, ModelState.STARTING, ModelState.STOPPING, ModelState.STOPPED


@pytest.mark.parametrize(("strategy", "states", "in_flight", "spillover", "chosen"), [
    ("pin", {"a": O, "b": R}, {}, 1, "a"),  # always the first
    ("warm", {"a": O, "b": R, "c": R}, {}, 1, "b"),  # the first ready
    ("warm", {"a": O, "b": S, "c": O}, {}, 1, "b"),  # else the first starting
    ("warm", {"a": O, "b": O}, {}, 1, "a"),  # else the first, cold
    ("spillover", {"a": O, "b": O}, {}, 2, "a"),  # nothing active: the first
    ("spillover", {"a": R, "b": O}, {"a": 1}, 2, "a"),  # a has room (1 < 2)
    ("spillover", {"a": R, "b": O}, {"a": 2}, 2, "b"),  # a is full: the next target starts
    ("spillover", {"a": R, "b": R}, {"a": 2, "b": 1}, 2, "b"),  # the least busy active one
    ("spillover", {"a": R, "b": R}, {"a": 3, "b": 3}, 2, "a"),  # all full, none cold: the least busy, first
    ("spillover", {"a": X, "b": O}, {}, 1, "b"),  # a stopping target is skipped
    ("spillover", {"a": R, "peer/m": None}, {"a": 1}, 1, "peer/m"),  # a peer's model is cold until used
])
def test_selector_strategies(strategy, states, in_flight, spillover, chosen):
    selector = SelectorSpec("s", strategy, tuple(states), spillover)
    assert choose(selector, states.get, lambda t: in_flight.get(t, 0)) == chosen
