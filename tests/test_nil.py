"""The NIL decision and the out-of-KB evaluation (`kgmel_core.nil`) against hand computations."""

import math

import numpy as np
import polars as pl
import pytest

from kgmel_core.metrics import metric_tables
from kgmel_core.nil import (
    best_threshold,
    fit_logistic,
    fit_nil_model,
    list_features,
    nil_scores,
    out_of_kb_evaluation,
    outcome_metrics,
    precision_recall_curve,
    with_name_match,
    withheld_entities,
    without_entities,
)


def _lists(rows):
    return pl.DataFrame(rows, schema={"mention_id": pl.String, "rank": pl.Int32, "qid": pl.String, "score": pl.Float32},
                        orient="row")


def test_only_entities_never_gold_in_train_are_withheld_until_their_mentions_reach_the_share():
    val = pl.DataFrame({"mention_id": [f"m{i}" for i in range(10)],
                        "gold_qid": ["Q1", "Q1", "Q2", "Q3", "Q4", "Q5", "Q6", "Q7", "Q8", None]})
    chosen = withheld_entities(val, train_gold={"Q1", "Q2", "Q3"}, share=0.3, seed=0)
    assert chosen <= {"Q4", "Q5", "Q6", "Q7", "Q8"} and len(chosen) == 3  # one mention each: 3 of 10
    assert withheld_entities(val, {"Q1", "Q2", "Q3"}, 0.3, seed=0) == chosen  # seeded
    assert withheld_entities(val, {"Q4", "Q5", "Q6", "Q7", "Q8", "Q2", "Q3"}, 0.3, 0) == {"Q1"}  # 2 mentions
    assert withheld_entities(val, {f"Q{i}" for i in range(1, 9)}, 0.3, 0) == set()


def test_withholding_drops_the_entity_from_every_list_and_renumbers_the_ranks():
    ranked = _lists([("m1", 1, "Q1", 0.9), ("m1", 2, "Q2", 0.8), ("m1", 3, "Q3", 0.1), ("m2", 1, "Q2", 0.7)])
    kept = without_entities(ranked, {"Q1"})
    assert kept.select("mention_id", "rank", "qid").rows() == [("m1", 1, "Q2"), ("m1", 2, "Q3"), ("m2", 1, "Q2")]


def test_list_features_are_the_top1_scores_and_the_margin_and_nan_without_a_list():
    ranked = _lists([("m1", 2, "Q2", 0.5), ("m1", 1, "Q1", 0.9), ("m2", 1, "Q2", 0.7)])
    x, names = list_features(ranked, ["m1", "m2", "m3"])
    assert names == ["score", "margin"]
    assert x[0] == pytest.approx([0.9, 0.4]) and x[1] == pytest.approx([0.7, 0.0])  # no runner-up: margin 0
    assert np.isnan(x[2]).all()


def test_name_match_is_the_word_overlap_of_surface_and_label():
    ranked = _lists([("m1", 1, "Q1", 0.9), ("m1", 2, "Q2", 0.8)])
    mentions = pl.DataFrame({"mention_id": ["m1"], "mention": ["Michael Jordan"]})
    entities = pl.DataFrame({"qid": ["Q1", "Q2"], "label": ["Michael Jordan", "Jordan River"]})
    assert with_name_match(ranked, mentions, entities)["name_match"].to_list() == pytest.approx([1.0, 1 / 3])


def test_nil_scores_and_the_best_threshold_by_hand():
    scores = nil_scores(np.array([True, True, False, False]), np.array([True, False, True, False]))
    assert scores == {"nil_precision": 0.5, "nil_recall": 0.5, "nil_f1": 0.5}
    assert nil_scores(np.zeros(3, bool), np.zeros(3, bool)) == {"nil_precision": 0.0, "nil_recall": 0.0,
                                                                "nil_f1": 0.0}
    # cut 0.8 predicts exactly the two NIL mentions (F1 1); 0.9 only one (F1 2/3); 0.3 adds a false one
    assert best_threshold(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, True, False, False])) == 0.8


def test_a_cost_bound_keeps_the_threshold_where_few_right_answers_become_nil():
    """Two in-KB mentions, both answered right (1, 3); two NIL (0, 2). Cut 0.9: NIL {0}, F1 2/3, cost 0;
    0.8: {0, 1}, F1 1/2, cost 50 points; 0.7: {0, 1, 2}, F1 4/5, cost 50; 0.3: all, F1 2/3, cost 100."""
    probability = np.array([0.9, 0.8, 0.7, 0.3])
    is_nil, correct = np.array([True, False, True, False]), np.array([False, True, False, True])
    assert best_threshold(probability, is_nil) == 0.7
    assert best_threshold(probability, is_nil, correct, max_cost=50.0) == 0.7
    assert best_threshold(probability, is_nil, correct, max_cost=10.0) == 0.9
    never = best_threshold(np.array([0.9, 0.1]), np.array([False, True]), np.array([True, False]), max_cost=0.0)
    assert never > 1.0  # every cut costs a right answer: a cut above every probability


def test_the_logistic_fit_satisfies_its_optimality_condition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(scale=0.8, size=200) > 0).astype(float)
    weights, bias = fit_logistic(x, y, l2=0.1)
    p = 1 / (1 + np.exp(-(x @ weights + bias)))
    assert np.abs(x.T @ (p - y) + 0.1 * weights).max() < 1e-8  # d/dw of the penalised log-loss is 0
    assert abs(np.sum(p - y)) < 1e-8  # the bias is not penalised
    assert weights[0] > 0 > weights[1]


def test_a_model_needs_both_classes():
    with pytest.raises(ValueError, match="both NIL and in-KB"):
        fit_nil_model(np.ones((4, 2)), np.zeros(4, bool), ["score", "margin"])


def test_out_of_kb_evaluation_counts_every_outcome():
    """40 val mentions, each with its own entity; mentions of withheld entities keep only low-scoring
    namesakes, so a low top-1 score marks them, and the model finds them out of fold."""
    rng = np.random.default_rng(1)
    rows, golds = [], []
    for i in range(40):
        gold = f"Q{i}"
        golds.append(gold)
        rows += [(f"m{i}", 1, gold, float(0.8 + 0.1 * rng.random())), (f"m{i}", 2, f"Q{100 + i}", 0.3)]
    mentions = pl.DataFrame({"mention_id": [f"m{i}" for i in range(40)], "gold_qid": golds, "split": ["val"] * 40})
    metrics, outcomes = out_of_kb_evaluation(_lists(rows), mentions, train_gold=set(), share=0.25, seed=0)
    assert metrics["nil_mentions"] == 10 and metrics["withheld_entities"] == 10 and metrics["n"] == 40
    assert metrics["in_kb_hits@1"] == 100.0  # the other 30 keep their gold at rank 1
    assert metrics["nil_f1"] == 1.0 and metrics["in_kb_hits@1_with_nil"] == 100.0
    assert metrics["accuracy_with_nil"] == 100.0
    assert outcomes["is_nil"].sum() == 10 and (outcomes["predicted_nil"] == outcomes["is_nil"]).all()
    assert not outcomes.filter(pl.col("is_nil"))["top1_correct"].any()  # the gold is gone: never right
    curve = precision_recall_curve(outcomes)
    assert curve["nil_recall"].max() == 1.0 and curve.filter(pl.col("nil_recall") == 1.0)["nil_precision"].max() == 1.0


def test_outcome_metrics_by_hand():
    """m1, m2 NIL; m3..m5 in the KB. Predicted NIL: m1 (right), m3 (an in-KB mention lost). Top-1 right: m3, m4."""
    is_nil = np.array([True, True, False, False, False])
    predicted = np.array([True, False, True, False, False])
    correct = np.array([False, False, True, True, False])
    metrics = outcome_metrics(is_nil, predicted, correct)
    assert metrics["nil_precision"] == 0.5 and metrics["nil_recall"] == 0.5
    assert metrics["in_kb_hits@1"] == pytest.approx(100 * 2 / 3)  # m3, m4 of three
    assert metrics["in_kb_hits@1_with_nil"] == pytest.approx(100 / 3)  # m3 answered NIL: a miss
    assert metrics["accuracy_with_nil"] == pytest.approx(100 * 2 / 5)  # m1 (NIL) and m4


def test_out_of_kb_rows_print_as_their_own_table():
    metrics = pl.DataFrame({"method": ["kgmel", "kgmel, out-of-KB", "kgmel, out-of-KB"], "split": ["val"] * 3,
                            "metric": ["hits@1", "nil_f1", "nil_mentions"], "value": [80.0, 0.714, 12.0]})
    titles = [title for title, _ in metric_tables(metrics)]
    assert titles[0] == "retrieval" and titles[1].startswith("out-of-KB")
    nil = metric_tables(metrics)[1][1]
    assert nil.row(0, named=True) == {"method": "kgmel, out-of-KB", "split": "val", "nil": 12, "nil F1": 0.71}
    assert not math.isnan(metric_tables(metrics)[0][1]["hits@1"][0])


def _synthetic(n: int):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        rows += [(f"m{i}", 1, f"Q{i}", float(0.8 + 0.1 * rng.random())), (f"m{i}", 2, f"Q{100 + i}", 0.3)]
    mentions = pl.DataFrame({"mention_id": [f"m{i}" for i in range(n)], "mention": [f"name {i}" for i in range(n)],
                             "gold_qid": [f"Q{i}" for i in range(n)], "split": ["val"] * n})
    entities = pl.DataFrame({"qid": [f"Q{i}" for i in range(n)] + [f"Q{100 + i}" for i in range(n)],
                             "label": [f"name {i}" for i in range(n)] + [f"other {i}" for i in range(n)]})
    return _lists(rows), mentions, entities


def test_the_evaluate_stage_reports_the_final_list_out_of_kb_or_says_why_not():
    from kgmel_core.evaluation import Evaluation, OutOfKB, Reranked, Served, out_of_kb_rows

    candidates, mentions, entities = _synthetic(40)
    served = Served(candidates, 2, pl.DataFrame(), pl.DataFrame())
    result = Evaluation(pl.DataFrame())
    rows = out_of_kb_rows("kgmel", mentions, served, None, OutOfKB(entities, set(), 0.25, 0), result)
    values = {r["metric"]: r["value"] for r in rows}
    assert {r["method"] for r in rows} == {"kgmel, out-of-KB"} and values["nil_mentions"] == 10
    assert result.nil_outcomes.height == 40 and "out_of_kb_skipped" not in result.stats
    reranked = Reranked(pl.DataFrame(), True, candidates.with_columns(reranker_score=pl.col("score")))
    rows = out_of_kb_rows("kgmel", mentions, served, reranked, OutOfKB(entities, set(), 0.25, 0), result)
    assert {r["method"] for r in rows} == {"kgmel + reranker, out-of-KB"}  # the final list is the reranker's

    small, small_mentions, small_entities = _synthetic(3)
    skipped = Evaluation(pl.DataFrame())
    served = Served(small, 2, pl.DataFrame(), pl.DataFrame())
    assert out_of_kb_rows("kgmel", small_mentions, served, None, OutOfKB(small_entities, set(), 0.1, 0), skipped) == []
    assert skipped.stats["out_of_kb_skipped"].startswith("too few val mentions to fit the NIL model out of fold")


def test_a_skipped_out_of_kb_evaluation_is_a_run_summary_note():
    from types import SimpleNamespace

    from flows.summary import skip_warnings
    from storage.runs import StageRecord

    stats = {"out_of_kb_skipped": "too few val mentions to fit the NIL model out of fold: 0 NIL of 7 in fold 0"}
    store = SimpleNamespace(require=lambda stage, key: SimpleNamespace(manifest={"stats": stats}))
    assert skip_warnings(store, [StageRecord("evaluate", "k", False, 9, 0.1)]) == [
        "NOTE evaluate: no out-of-KB evaluation: too few val mentions to fit the NIL model out of fold: 0 NIL of 7 "
        "in fold 0"]


def test_the_benchmark_table_has_each_variant_once_the_baselines_once_and_the_out_of_kb_rows():
    from kgmel_core.benchmark import VariantResult, benchmark_table

    def metrics(rows):
        return pl.DataFrame(rows, schema={"method": pl.String, "metric": pl.String, "value": pl.Float64},
                            orient="row").with_columns(split=pl.lit("val"))

    base = [("zero-shot text", "hits@1", 50.0), ("zero-shot names", "hits@1", 60.0),
            ("zero-shot text + names", "hits@1", 70.0)]
    retriever = VariantResult(
        "kgmel", metrics([*base, ("kgmel", "hits@1", 80.0), ("kgmel, out-of-KB", "nil_f1", 0.6)]),
        {"seconds": 12.0, "epoch_seconds": [1.0, 3.0, 2.0], "epochs_run": 3, "best_epoch": 2}, is_reranker=False,
        history=pl.DataFrame({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.5], "val_hits1": [70.0, 80.0, 79.0]}),
        nil_outcomes=pl.DataFrame({"mention_id": ["m1", "m2"], "is_nil": [True, False],
                                   "nil_probability": [0.9, 0.1], "predicted_nil": [True, False],
                                   "top1_correct": [False, True]}))
    reranker = VariantResult(
        "kgmel + reranker", metrics([*base, ("kgmel + reranker", "hits@1", 85.0),
                                     ("kgmel + rerank", "gain_vs_top1", 5.0), ("kgmel + rerank", "gain_ci95", 1.0)]),
        {"train_seconds": 60.0, "val_scoring_seconds": 2.0, "val_mentions_scored": 100}, is_reranker=True)
    table, curves, nil_curves = benchmark_table("demo", [retriever, reranker])
    values = {(m, k): v for _, m, _, k, v in table.iter_rows()}
    assert values[("kgmel", "hits@1")] == 80.0 and values[("kgmel", "s_per_epoch")] == 2.0  # the median
    assert values[("kgmel + reranker", "gain")] == 5.0 and values[("kgmel + reranker", "ms_per_mention")] == 20.0
    assert values[("kgmel, out-of-KB", "nil_f1")] == 0.6
    assert table.filter(pl.col("method") == "zero-shot text").height == 1  # once, not once per variant
    assert curves["variant"].unique().to_list() == ["kgmel"] and nil_curves["variant"].unique().to_list() == ["kgmel"]


def _served_model():
    from kgmel_core.nil import fit_served_model

    candidates, mentions, entities = _synthetic(40)
    lists = with_name_match(candidates, mentions, entities)
    return fit_served_model(lists, mentions, train_gold=set(), share=0.25, seed=0)


def test_the_served_model_is_fitted_on_every_val_mention_and_round_trips_through_its_table():
    from kgmel_core import schemas
    from kgmel_core.nil import NilModel

    model, stats = _served_model()
    assert stats["val_mentions"] == 40 and stats["nil_mentions"] == 10 and stats["withheld_entities"] == 10
    assert model.features == ("score", "name_match", "margin") and 0 < model.threshold < 1
    table = pl.from_arrow(model.table().to_arrow().cast(schemas.NIL_MODEL))  # as stored
    assert NilModel.from_table(table) == model
    with pytest.raises(ValueError, match="one row"):
        NilModel.from_table(pl.concat([model.table(), model.table()]))


def test_a_mention_whose_candidates_all_score_far_below_the_in_kb_ones_is_nil():
    from kgmel_core.nil import nil_decisions

    model, _ = _served_model()
    new = pl.DataFrame(
        [("sure", 1, "Q1", 0.88, 1.0), ("sure", 2, "Q2", 0.3, 0.0),  # like an in-KB val mention
         ("absent", 1, "Q3", 0.05, 0.0), ("absent", 2, "Q4", 0.04, 0.0),  # only far-off candidates
         ("skipped", 1, "Q5", None, 1.0)],  # a score the model reads is missing: undecided
        schema={"mention_id": pl.String, "rank": pl.Int32, "qid": pl.String, "score": pl.Float64,
                "name_match": pl.Float64}, orient="row")
    decided = nil_decisions(model, new, ["sure", "absent", "skipped", "unlisted"])
    rows = {m: (s, n) for m, s, n in decided.iter_rows()}
    assert rows["sure"][1] is False and rows["sure"][0] < model.threshold
    assert rows["absent"][1] is True and rows["absent"][0] > 0.99
    assert rows["skipped"] == (None, False)
    assert rows["unlisted"] == (1.0, True)  # nothing answers it
    everything = nil_decisions(model, new, ["sure", "absent"], threshold=0.0)  # an explicit threshold wins
    assert everything["nil"].to_list() == [True, True]
    with pytest.raises(ValueError, match="have no name_match"):
        nil_decisions(model, new.drop("name_match"), ["sure"])


def test_the_registry_keeps_each_versions_nil_model(tmp_path):
    from storage.fs import StoreFS
    from storage.registry import ModelRegistry

    registry = ModelRegistry(StoreFS(str(tmp_path)))
    registry.register("m", "train-a", "index-a", nil="nil-a")
    registry.register("m", "train-b", "index-b", nil="nil-b")
    registry.register("m", "train-a", "index-a", nil="nil-a2")  # refitted for the same retriever
    state = registry.state("m")
    assert [(v.number, v.nil) for v in state.versions] == [(1, "nil-a2"), (2, "nil-b")]
