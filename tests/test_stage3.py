"""Stage 3's pure logic: which mentions are in scope, the per-mention triple filter over the
candidates, the LLM plan and how its answers become predictions, and the evaluation rows."""

import math

import numpy as np
import polars as pl
import pytest
import torch

from kgmel_core.config import LLMScope
from kgmel_core.data.scope import in_scope
from kgmel_core.data.texts import text_sha
from kgmel_core.evaluation import Reranked, Served, evaluate_tables, metric_rows
from kgmel_core.llm.client import LLMResult
from kgmel_core.rerank.candidates import candidate_lists, relation_tail_pairs
from kgmel_core.rerank.filtering import TextVectors, filter_mentions
from kgmel_core.rerank.llm_choice import llm_predictions, plan_llm_rerank
from kgmel_core.retrieval.features import Banks, Features, SideFeatures
from kgmel_core.schemas import vector_column

MENTIONS = pl.DataFrame(
    {
        "mention_id": ["m3", "m1", "m2", "m4"],
        "sentence": ["s3", "Jordan scored", "s2", "s4"],
        "mention": ["x", "Jordan", "y", "z"],
        "split": ["val", "val", "train", "val"],
        "gold_qid": ["Q1", "Q2", "Q1", "Q3"],
    }
)
CANDIDATES = pl.DataFrame(
    {
        "mention_id": ["m1", "m1", "m1", "m3", "m3"],
        "rank": [1, 2, 3, 2, 1],
        "qid": ["Q1", "Q2", "Q3", "Q2", "Q1"],
        "score": [0.9, 0.85, 0.1, 0.2, 0.8],
    }
)


def test_scope_picks_splits_sorted_by_id_then_the_first_or_a_seeded_sample():
    assert in_scope(MENTIONS, LLMScope())["mention_id"].to_list() == ["m1", "m2", "m3", "m4"]
    assert in_scope(MENTIONS, LLMScope(splits=["val"], max_mentions=2))["mention_id"].to_list() == ["m1", "m3"]
    sample = in_scope(MENTIONS, LLMScope(splits=["val"], max_mentions=2, sample_seed=7))["mention_id"].to_list()
    assert sample == sorted(sample) and len(sample) == 2
    assert sample == in_scope(MENTIONS, LLMScope(splits=["val"], max_mentions=2, sample_seed=7))["mention_id"].to_list()


def test_scope_per_split_takes_n_of_each_split_and_one_splits_size_never_moves_anothers_sample():
    mentions = pl.DataFrame({
        "mention_id": [f"m{i:02d}" for i in range(20)],
        "split": ["train", "val"] * 10,
    })
    first = in_scope(mentions, LLMScope(per_split={"train": 2, "val": 3}))
    assert first["mention_id"].to_list() == ["m00", "m01", "m02", "m03", "m05"]
    sampled = in_scope(mentions, LLMScope(per_split={"train": 4, "val": 3}, sample_seed=1))
    assert dict(sampled.group_by("split").len().iter_rows()) == {"train": 4, "val": 3}
    bigger_train = in_scope(mentions, LLMScope(per_split={"train": 8, "val": 3}, sample_seed=1))
    val = pl.col("split") == "val"
    assert sampled.filter(val)["mention_id"].to_list() == bigger_train.filter(val)["mention_id"].to_list()
    with pytest.raises(ValueError, match="per_split, or splits/max_mentions, not both"):
        LLMScope(per_split={"val": 3}, max_mentions=5)
    with pytest.raises(ValueError, match="sizes >= 1"):
        LLMScope(per_split={"val": 0})


def test_candidate_lists_are_in_rank_order_and_cut_at_k():
    assert candidate_lists(CANDIDATES, 2) == {"m1": ["Q1", "Q2"], "m3": ["Q1", "Q2"]}


def test_relation_tail_pairs_group_by_one_or_two_keys_in_table_order():
    table = pl.DataFrame({"mention_id": ["a", "a", "b"], "qid": ["Q1", "Q1", "Q2"],
                          "relation": ["r1", "r2", "r3"], "tail": ["t1", "t2", "t3"]})
    assert relation_tail_pairs(table, "mention_id") == {"a": [("r1", "t1"), ("r2", "t2")], "b": [("r3", "t3")]}
    assert relation_tail_pairs(table, "mention_id", "qid")[("b", "Q2")] == [("r3", "t3")]


def _vectors(named: dict[str, list[float]]) -> TextVectors:
    texts = list(named)
    table = pl.DataFrame({"text_sha": [text_sha(t) for t in texts], "text": texts})
    table = table.with_columns(pl.Series("vector", vector_column(np.array(list(named.values()), np.float32))))
    return TextVectors([table, table])  # a string in two tables counts once


def test_filter_mentions_keeps_matching_triples_and_ranks_the_rest_by_their_context():
    kb = pl.DataFrame({"head_qid": ["Q1", "Q1", "Q2"], "relation": ["occupation", "sex", "occupation"],
                       "tail": ["actor", "male", "painter"]})
    generated = pl.DataFrame({"mention_id": ["m1"], "relation": ["occupation"], "tail": ["actor"]})
    vectors = _vectors({"occupation": [1, 0], "sex": [0, 1], "actor": [1, 0], "male": [0, 1], "painter": [0.6, 0.8],
                        "x: about painting": [0, 1]})
    mentions = pl.DataFrame({"mention_id": ["m1", "m3"]})
    contexts = ["unused", "x: about painting"]
    candidates = {"m1": ["Q1", "Q2"], "m3": ["Q2", "Q1"]}
    result = filter_mentions(mentions, candidates, kb, generated, vectors, contexts, "filtered", n=1, max_per_entity=5)
    # m1: relations top 2 of {occupation, sex}: both; tails top 1: actor -> only (Q1, occupation, actor).
    # m3 has no generated triples: each candidate's n=1 fact most like its context (0,1): Q2's only one; for Q1
    # sex+male (0+1 + 0+1 = 2) beats occupation+actor (0 + 0)
    assert result.kept.rows() == [("m1", "Q1", "occupation", "actor"), ("m3", "Q2", "occupation", "painter"),
                                  ("m3", "Q1", "sex", "male")]
    assert result.counts.rows() == [("m1", 3, 1), ("m3", 3, 2)]
    assert result.by_context == 1
    first = filter_mentions(mentions[:1], candidates, kb, generated, vectors, contexts[:1], "first", 1, 1)
    assert first.kept.rows() == [("m1", "Q1", "occupation", "actor"), ("m1", "Q2", "occupation", "painter")]
    none = filter_mentions(mentions, candidates, kb, generated, vectors, contexts, "none", 1, 5)
    assert none.kept.height == 0 and none.counts["triples_before"].to_list() == [3, 3]


def test_llm_plan_sends_only_unsure_in_scope_mentions_and_predictions_count_every_outcome():
    entities = pl.DataFrame({"qid": ["Q1", "Q2", "Q3"], "label": ["Michael Jordan", "Jordan", "Jordan River"],
                             "description": ["player", "country", "river"]})
    margins = {"m1": 0.05, "m3": 0.6}
    candidates = candidate_lists(CANDIDATES, 3)
    scoped = MENTIONS.filter(pl.col("mention_id").is_in(["m1", "m3"]))
    empty = pl.DataFrame(schema={"mention_id": pl.String, "qid": pl.String, "relation": pl.String, "tail": pl.String})
    plan = plan_llm_rerank(scoped, candidates, margins, 0.1, entities, empty, None, None, 160, "question_first")
    assert plan.sent == {"m1"} and [mid for mid, _ in plan.requests] == ["m1"]
    assert plan.options["m1"] == [("Q1", "Michael Jordan"), ("Q2", "Jordan"), ("Q3", "Jordan River")]
    answered = [LLMResult("m1", "Q2", {"call_id": "c1"})]
    predictions, outcomes = llm_predictions(["m1", "m2", "m3"], {"m1", "m3"}, plan, candidates, margins, answered)
    assert predictions.select("mention_id", "qid", "source", "reason").rows() == [
        ("m1", "Q2", "llm", None), ("m2", None, "fallback", "out_of_scope"), ("m3", "Q1", "retrieval", "confident"),
    ]
    assert outcomes == {"llm": 1, "out_of_scope": 1, "confident": 1}
    failed = [LLMResult("m1", None, {"call_id": "c2"})]
    predictions, outcomes = llm_predictions(["m1"], {"m1"}, plan, candidates, margins, failed)
    assert predictions.row(0)[1:4] == ("Q1", "fallback", "call_failed") and outcomes == {"call_failed": 1}


def _features(splits: list[str], gold: list[int]) -> Features:
    texts = torch.eye(4)
    banks = Banks(texts, {}, torch.zeros((1, 4)), {})

    def side(ids, heads):
        n = len(ids)
        return SideFeatures(ids, torch.tensor(heads), torch.tensor(heads), torch.full((n,), -1),
                            torch.zeros((0, 2), dtype=torch.long), torch.zeros((n, 0), dtype=torch.long),
                            torch.zeros((n, 0), dtype=torch.bool))

    return Features(banks, side(["m1", "m3"], [0, 1]), side(["Q1", "Q2", "Q3"], [0, 1, 2]), splits,
                    torch.tensor(gold))


def test_metric_rows_are_per_split_with_counts():
    rows = metric_rows("x", ["val", "val", "test"], np.array([1.0, 3.0, math.inf]), {"flag": np.array([1, 0, 1])})
    val = {r["metric"]: r["value"] for r in rows if r["split"] == "val"}
    assert val["hits@1"] == 50.0 and val["hits@3"] == 100.0 and val["flag"] == 1 and val["n"] == 2
    assert math.isclose(val["mrr"], (1 + 1 / 3) / 2)


def test_evaluate_tables_scores_served_candidates_and_a_reranker_against_the_same_top1():
    features = _features(["val", "val"], [1, 0])  # m1's gold is Q2, m3's Q1
    mentions = pl.DataFrame({"mention_id": ["m1", "m3"], "gold_qid": ["Q2", "Q1"]})
    fused_m = pl.DataFrame({"mention_id": ["m3", "m1"]}).with_columns(
        pl.Series("vector", vector_column(np.array([[1, 0], [0, 1]], np.float32))))
    fused_e = pl.DataFrame({"qid": ["Q2", "Q1", "Q3"]}).with_columns(
        pl.Series("vector", vector_column(np.array([[0, 1], [1, 0], [0.5, 0.5]], np.float32))))
    predictions = pl.DataFrame({"mention_id": ["m1", "m3"], "qid": ["Q2", "Q1"], "source": ["llm", "retrieval"],
                                "reason": [None, "confident"], "margin": [0.05, 0.6]})
    result = evaluate_tables(features, mentions, "kgmel", Served(CANDIDATES, 3, fused_m, fused_e),
                             Reranked(predictions, sent_all=True))
    value = {(m, k): v for m, s, k, v in result.metrics.rows()}
    assert value[("kgmel", "hits@1")] == 50.0 and value[("kgmel", "hits@3")] == 100.0  # m1's gold at rank 2
    assert value[("kgmel (exact search, diagnostic)", "hits@1")] == 100.0
    assert value[("kgmel + rerank", "hits@1")] == 100.0 and value[("kgmel top-1 (same mentions)", "hits@1")] == 50.0
    assert value[("kgmel + rerank", "gain_vs_top1")] == 50.0 and value[("kgmel + rerank", "sent_to_llm")] == 0.5
    assert result.gate_curve.height == 3 and result.stats["served_top_k"] == 3


def test_training_refuses_too_few_train_mentions_in_the_kb_or_no_val_split_before_any_epoch():
    from kgmel_core.config import RetrieverConfig, TrainingConfig
    from kgmel_core.retrieval.training import train_on_features

    with pytest.raises(ValueError, match="need at least 2 training mentions with their gold entity in the KB, have 1"):
        train_on_features(_features(["train", "train"], [1, -1]), RetrieverConfig(), TrainingConfig())
    with pytest.raises(ValueError, match="no 'val' mentions"):
        train_on_features(_features(["train", "train"], [1, 0]), RetrieverConfig(), TrainingConfig())
