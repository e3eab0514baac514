import math

import polars as pl

from kgmel_core.rerank.gate import gate_curve, is_sent, knee, retrieval_margins


def test_margins_are_top1_minus_top2_and_inf_for_a_single_candidate():
    candidates = pl.DataFrame(
        {"mention_id": ["a", "a", "a", "b"], "rank": [1, 2, 3, 1], "score": [0.9, 0.7, 0.1, 0.5]}
    )
    margins = dict(retrieval_margins(candidates).iter_rows())
    assert math.isclose(margins["a"], 0.2, abs_tol=1e-6) and margins["b"] == math.inf


def test_threshold_zero_sends_none_and_none_or_inf_sends_all():
    margins = [0.0, 0.01, 0.5, math.inf]
    assert not any(is_sent(m, 0.0) for m in margins)
    assert all(is_sent(m, None) for m in margins) and all(is_sent(m, math.inf) for m in margins)
    assert [is_sent(m, 0.3) for m in margins] == [True, True, False, False]


def test_gate_curve_counts_add_up_against_a_hand_computation():
    outcomes = pl.DataFrame(
        {
            "mention_id": ["a", "b", "c", "d"],
            "margin": [0.05, 0.05, 0.2, 0.9],
            "llm_hit": [True, True, False, True],
            "top1_hit": [False, True, True, True],
        }
    )
    curve = gate_curve(outcomes)
    # none sent: 3/4; a,b sent (equal margins go together): 4/4; +c: 3/4; all: 3/4
    assert curve.rows() == [(0.0, 0.0, 75.0), (0.2, 0.5, 100.0), (0.9, 0.75, 75.0), (math.inf, 1.0, 75.0)]
    assert knee(curve) == 0.2


def test_knee_sends_nothing_when_the_llm_never_helps():
    outcomes = pl.DataFrame(
        {"mention_id": ["a", "b"], "margin": [0.1, 0.3], "llm_hit": [False, True], "top1_hit": [True, True]}
    )
    assert knee(gate_curve(outcomes)) == 0.0
