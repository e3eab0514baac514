import math

import numpy as np
import polars as pl
import pytest
import torch

from kgmel_core.metrics import candidate_ranks, gold_ranks, ranking_metrics
from kgmel_core.retrieval.losses import info_nce, kgmel_loss, self_info_nce


def test_info_nce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(0)))
    assert info_nce(q, k, torch.tensor([0]), 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_self_info_nce_ignores_items_of_the_same_group():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    with_group = self_info_nce(x, torch.tensor([0, 0, 1]), tau=1.0)
    # item 0: positives self (1), the same-group twin is masked, negative item 2 (0)
    l0 = -math.log(math.e / (math.e + 1))
    l2 = -math.log(math.e / (math.e + 2))  # item 2: self 1, two negatives scoring 0
    assert with_group.item() == pytest.approx((2 * l0 + l2) / 3, rel=1e-6)


def test_kgmel_loss_adds_weighted_terms():
    torch.manual_seed(0)
    m = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(3, 3), dim=-1)
    t = torch.tensor([0, 1, 2, 0])
    total = kgmel_loss(m, e, t, 0.1, 0.2, 0.3)
    parts = info_nce(m, e, t, 0.1) + 0.2 * self_info_nce(m, t, 0.1) + 0.3 * self_info_nce(e, torch.arange(3), 0.1)
    assert torch.allclose(total, parts)


def test_gold_ranks_are_pessimistic_on_ties_and_inf_when_gold_missing():
    entities = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    mentions = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    ranks, ties = gold_ranks(mentions, entities, [2, 3, -1])
    # mention 0: gold (row 2) ties with row 0 -> rank 2; mention 1: row 1 scores 1.0 > 0.8 -> rank 2
    assert ranks.tolist() == [2.0, 2.0, math.inf] and ties == 1


def test_ranking_metrics_count_missing_gold_as_misses():
    metrics = ranking_metrics(np.array([1.0, 2.0, 20.0, math.inf]), hits_at=(1, 3, 16))
    assert metrics["hits@1"] == 25.0 and metrics["hits@3"] == 50.0 and metrics["hits@16"] == 50.0
    assert metrics["mrr"] == pytest.approx((1 + 0.5 + 0.05 + 0) / 4)
    assert metrics["n"] == 4


def test_candidate_ranks_are_positions_in_the_served_list_inf_when_absent():
    candidates = pl.DataFrame(
        {"mention_id": ["a", "a", "b", "b", "c"], "rank": [1, 2, 1, 2, 1], "qid": ["Q1", "Q2", "Q3", "Q4", "Q5"]}
    )
    ranks = candidate_ranks(candidates, ["b", "a", "c", "d"], ["Q4", "Q1", "Q9", None])
    assert ranks.tolist() == [2.0, 1.0, math.inf, math.inf]


def test_ranking_metrics_from_a_served_depth_leave_deeper_hits_unknown():
    metrics = ranking_metrics(np.array([1.0, 3.0, math.inf]), hits_at=(1, 3, 16), depth=8)
    assert metrics["hits@1"] == pytest.approx(100 / 3) and metrics["hits@3"] == pytest.approx(200 / 3)
    assert math.isnan(metrics["hits@16"]) and metrics["mrr"] == pytest.approx((1 + 1 / 3) / 3)


def test_metric_tables_keep_rerank_rows_apart_with_their_own_columns():
    from kgmel_core.metrics import metric_tables

    rows = [("kgmel", "val", "hits@1", 80.0), ("kgmel", "val", "mrr", 0.9),
            ("kgmel + rerank", "val", "hits@1", 70.0), ("kgmel + rerank", "val", "gain_vs_top1", -10.0),
            ("kgmel top-1 (same mentions)", "val", "hits@1", 80.0)]
    metrics = pl.DataFrame(rows, schema=["method", "split", "metric", "value"], orient="row")
    (_, retrieval), (_, rerank) = metric_tables(metrics)
    assert retrieval.rows() == [("kgmel", "val", 80.0, 0.9)]
    assert rerank.columns == ["method", "split", "hits@1", "gain"]
    assert rerank.rows() == [("kgmel + rerank", "val", 70.0, -10.0), ("kgmel top-1 (same mentions)", "val", 80.0, None)]
    assert len(metric_tables(metrics.head(2))) == 1  # no rerank rows, no second table


def test_wide_metrics_put_val_first_and_show_counts_as_integers():
    from kgmel_core.metrics import RERANK_SHOWN, wide_metrics

    rows = [("kgmel", split, metric, value) for split in ("train", "test", "val", "extra")
            for metric, value in (("hits@1", 50.0), ("n", 8.0))]
    wide = wide_metrics(pl.DataFrame(rows, schema=["method", "split", "metric", "value"], orient="row"), RERANK_SHOWN)
    assert wide["split"].to_list() == ["val", "test", "train", "extra"]
    assert wide.schema["n"] == pl.Int64 and wide["n"].to_list() == [8, 8, 8, 8]
