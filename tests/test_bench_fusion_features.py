"""`bench.fusion_features`: its popularity feature, and the fit that lets a prior only vouch for an entity."""

import math

import numpy as np

from bench.fusion_features import FEATURES, fit, fit_nonnegative_priors, qid_order


def test_qid_order_is_the_log_of_the_q_number_and_nan_for_other_ids():
    assert qid_order("Q145") == math.log(145)
    assert qid_order("Q1") == 0.0
    for other in ("P31", "Q0", "Q01", "q145", "E-7", "Q"):
        assert math.isnan(qid_order(other))


def _lists_where_the_prior_marks_a_wrong_candidate(seed: int = 0):
    """The gold is the candidate with the best retrieval score; the mention prior is set on a wrong one."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(60):
        x = np.zeros((4, len(FEATURES)))
        x[:, 0] = rng.normal(size=4)
        x[:, 1] = x[:, 0] + rng.normal(scale=0.5, size=4)
        gold = int(np.argmax(x[:, 0]))
        x[(gold + 1) % 4, 2] = 1.0
        rows.append((f"m{i}", x, gold))
    return rows


def test_a_prior_that_marks_wrong_candidates_gets_a_negative_free_weight_and_is_dropped_when_held_nonnegative():
    rows = _lists_where_the_prior_marks_a_wrong_candidate()
    free, _ = fit(rows, [0, 1, 2])
    assert free[2] < 0
    weights, used = fit_nonnegative_priors(rows, [0, 1, 2])
    assert used == [0, 1] and len(weights) == 2
    np.testing.assert_allclose(weights, fit(rows, [0, 1])[0])


def test_a_prior_that_vouches_for_the_gold_keeps_its_positive_weight():
    rows = [(m, x.copy(), g) for m, x, g in _lists_where_the_prior_marks_a_wrong_candidate(1)]
    for _, x, gold in rows:
        x[:, 2] = 0.0
        x[gold, 2] = 1.0
    weights, used = fit_nonnegative_priors(rows, [0, 1, 2])
    assert used == [0, 1, 2] and weights[2] > 0
