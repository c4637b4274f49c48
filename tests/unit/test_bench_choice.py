"""What `berth bench --score-field` reads out of an answer, and how it says how decisive a model's scores are."""

from __future__ import annotations

from berth.bench.choice import score_summary
from berth.bench.runner import score_of


def test_a_score_is_a_finite_number_under_the_field_of_a_json_object():
    assert score_of('{"score": 7}', "score") == 7.0
    assert score_of('{"score": 0.25, "why": "x"}', "score") == 0.25
    for answer in ('{"score": "7"}', '{"score": true}', '{"score": null}', '{"rating": 7}', "[7]", "7",
                   '{"score": NaN}', '{"score": Infinity}', "not json", '{"score": 7', ""):
        assert score_of(answer, "score") is None, answer


def test_ties_at_the_top_say_how_decisive_the_scores_are():
    decisive = score_summary([3, 1, 9, 2, 1])
    assert (decisive["top"], decisive["ties_at_top"], decisive["ties_at_top_share"]) == (9, 1, 0.2)
    assert decisive["counts"] == {"1": 2, "2": 1, "3": 1, "9": 1} and decisive["distinct"] == 4
    assert decisive["mean"] == 3.2 and decisive["p50"] == 2
    undecided = score_summary([5, 5, 5, 4])
    assert (undecided["ties_at_top"], undecided["ties_at_top_share"]) == (3, 0.75)
    assert score_summary([])["scored"] == 0 and score_summary([])["ties_at_top_share"] is None
