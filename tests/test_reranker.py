"""The learned reranker's pure parts: what it reads (mention and candidate texts, groups and their
counts), the fusion against a hand computation, the ranked list and predictions."""

import math

import numpy as np
import polars as pl
import pytest
import torch
from rerank_stub import rerank_server

from kgmel_core.config import CrossEncoderConfig, LLMScope, RerankAPIConfig, RerankConfig
from kgmel_core.factory import create_cross_encoder
from kgmel_core.rerank import cross_encoder
from kgmel_core.rerank.cross_encoder import RerankGroup, candidate_input, lane_batch_size, mention_input
from kgmel_core.rerank.fusion import RERANKER_ONLY, Fusion, fit_fusion, fit_logit, fold_of, out_of_fold
from kgmel_core.rerank.groups import Stage3Mentions, Stage3Tables, build_groups
from kgmel_core.rerank.hosted import score_with_api
from kgmel_core.rerank.learned import fused_hits1, merged_scores, predictions_from_ranking, ranked_table
from kgmel_core.retrieval import device


def test_mention_input_marks_the_mention_in_place_or_puts_it_first():
    assert mention_input("Jordan", "Michael Jordan scored", 400).text == "Michael [ Jordan ] scored"
    assert mention_input("Hermann Beckerath", "Hermann von Beckerath sang", 400).text == (
        "Hermann Beckerath ; Hermann von Beckerath sang")
    described = mention_input("Jordan", "Jordan scored", 400, "a basketball player", [("sport", "basketball")])
    assert described.text == "[ Jordan ] scored ; a basketball player ; sport: basketball"


def test_a_long_sentence_keeps_a_window_around_the_mention_and_says_it_was_cut():
    sentence = "x" * 3000 + " Obama spoke " + "y" * 2000
    cut = mention_input("Obama", sentence, 100)
    assert cut.truncated and "[ Obama ]" in cut.text and len(cut.text) <= 104
    assert not mention_input("Obama", "Obama spoke", 100).truncated
    at_the_end = mention_input("Obama", "x" * 3000 + " Obama", 100)
    assert at_the_end.truncated and at_the_end.text.endswith("[ Obama ]")


def test_candidate_input_cuts_the_description_at_a_word_and_lists_facts():
    text = candidate_input("Ralph Meeker", "American actor of stage and screen", [("occupation", "actor")], 20)
    assert text == "Ralph Meeker ; American actor of ; occupation: actor"
    assert candidate_input("Iran", None, [], 20) == "Iran"
    assert candidate_input("Ralph Meeker", "American actor", [("occupation", "actor")], 0) == (
        "Ralph Meeker ; occupation: actor")  # no description wanted: no empty part either


def _groups_inputs():
    mentions = pl.DataFrame({"mention_id": ["m1", "m2", "m3"], "mention": ["Jordan", "Iran", "Nobody"],
                             "sentence": ["Jordan scored", "Iran voted", "Nobody came"], "split": ["val"] * 3,
                             "gold_qid": ["Q2", "Q9", None]})
    candidates = pl.DataFrame({"mention_id": ["m1", "m1", "m1", "m2"], "rank": [2, 1, 3, 1],
                               "qid": ["Q2", "Q1", "Q3", "Q5"], "score": [0.8, 0.9, 0.1, 0.7]})
    entities = pl.DataFrame({"qid": ["Q1", "Q2", "Q3", "Q5"], "label": ["Jordan", "Michael Jordan", "Jordan River",
                                                                          "Iran"],
                             "description": ["country", "basketball player", None, None]})
    filtered = pl.DataFrame({"mention_id": ["m1"], "qid": ["Q2"], "relation": ["sport"], "tail": ["basketball"]})
    return mentions, candidates, entities, filtered


def test_groups_follow_retrieval_order_mark_gold_and_count_what_is_missing():
    mentions, candidates, entities, filtered = _groups_inputs()
    groups, counts = build_groups(mentions, candidates, entities, filtered, CrossEncoderConfig(), k=2)
    assert [g.mention_id for g in groups] == ["m1", "m2"]
    first = groups[0]
    assert first.qids == ["Q1", "Q2"] and first.gold == 1  # rank 3 is cut at k=2
    assert first.candidate_texts == ["Jordan ; country", "Michael Jordan ; basketball player ; sport: basketball"]
    assert first.mention_text == "[ Jordan ] scored" and first.retrieval_scores.tolist() == pytest.approx([0.9, 0.8])
    assert groups[1].gold is None  # Q9 was not retrieved
    assert counts.without_candidates == 1 and counts.gold_not_retrieved == {"val": 1}
    assert counts.candidates_without_description == 1 and counts.candidates_without_facts == 2


def test_stage3_sends_the_unsure_mentions_in_scope_and_ranks_only_those():
    mentions, candidates, entities, filtered = _groups_inputs()
    mentions = mentions.with_columns(split=pl.Series(["val", "val", "test"]))
    config = RerankConfig(candidates=2, margin_threshold=0.15, scope=LLMScope(splits=["val"]))
    at = Stage3Mentions.of(Stage3Tables(mentions, candidates, entities, filtered), config)
    assert at.sent == {"m1"}  # margin 0.9 - 0.8 < 0.15; m2 has one candidate (margin inf); m3 is out of scope
    assert [g.mention_id for g in at.groups] == ["m1", "m2"] and [g.mention_id for g in at.sent_groups()] == ["m1"]
    ranked, predictions, outcomes = at.rank([np.array([0.0, 1.0], np.float32), None], [RERANKER_ONLY] * 2)
    assert ranked.select("mention_id", "qid", "retrieval_rank").rows() == [("m1", "Q2", 2), ("m1", "Q1", 1),
                                                                           ("m2", "Q5", 1)]
    assert predictions.select("mention_id", "qid", "source", "reason").rows() == [
        ("m1", "Q2", "reranker", None), ("m2", "Q5", "retrieval", "confident"),
        ("m3", None, "fallback", "out_of_scope")]
    assert outcomes == {"reranker": 1, "confident": 1, "out_of_scope": 1}
    assert at.stats()["mentions"] == 3 and at.stats()["in_scope"] == 2 and at.stats()["sent"] == 1


def test_fusion_fit_matches_a_hand_computed_optimum():
    # Two lists where only the reranker separates gold: the likelihood keeps growing with its weight (held
    # by the L2 term) and gives the retriever, which points the wrong way, a negative weight.
    reranker = [np.array([0.0, 1.0]), np.array([1.0, 0.0])]
    retrieval = [np.array([0.9, 0.8]), np.array([0.8, 0.9])]
    fusion = fit_fusion(reranker, retrieval, [1, 0])
    assert fusion.reranker > 0 and fusion.retrieval < 0
    # The fitted weights maximise the penalised likelihood: a small step either way does not improve it.
    def objective(a, b):
        z = [a * c + b * r for c, r in zip(reranker, retrieval, strict=True)]
        loss = -np.mean([zi[g] - np.log(np.exp(zi).sum()) for zi, g in zip(z, [1, 0], strict=True)])
        scale_c, scale_r = np.std(np.concatenate(reranker)), np.std(np.concatenate(retrieval))
        return loss + 1e-3 * ((a * scale_c) ** 2 + (b * scale_r) ** 2)
    best = objective(fusion.reranker, fusion.retrieval)
    for da, db in ((1e-2, 0), (-1e-2, 0), (0, 1e-2), (0, -1e-2)):
        assert objective(fusion.reranker + da, fusion.retrieval + db) >= best - 1e-6
    assert Fusion(2.0, 10.0).apply(np.array([1.0, 0.0]), np.array([0.5, 0.7])).tolist() == [7.0, 7.0]


def test_fit_logit_reports_its_penalised_loss_and_serves_any_number_of_features():
    rng = np.random.default_rng(1)
    features = [rng.normal(size=(5, 3)) for _ in range(30)]
    gold = [int(np.argmax(x[:, 0] + 0.5 * x[:, 2] + rng.normal(size=5))) for x in features] + [None]
    features.append(rng.normal(size=(5, 3)))  # a list without its gold takes no part
    weights, loss = fit_logit(features, gold)
    assert weights[0] > 0 and weights[2] > 0
    scale = np.concatenate(features[:30]).std(0)
    z = [x @ weights for x in features[:30]]
    by_hand = -np.mean([zi[g] - np.log(np.exp(zi).sum()) for zi, g in zip(z, gold, strict=False)])
    assert loss == pytest.approx(by_hand + 1e-3 * ((weights * scale) ** 2).sum(), rel=1e-9)
    pairs = [x[:, :2] for x in features]  # the two-feature case is the fusion, started from the reranker alone
    a, b = fit_logit(pairs, gold, start=(1.0, 0.0))[0]
    assert fit_fusion([x[:, 0] for x in pairs], [x[:, 1] for x in pairs], gold) == Fusion(float(a), float(b))
    with pytest.raises(ValueError, match="no list has its gold"):
        fit_logit(features[30:], [None])


def test_fusion_without_any_gold_is_the_reranker_alone_and_folds_are_stable():
    assert fit_fusion([np.array([1.0, 2.0])], [np.array([0.3, 0.2])], [None]) == RERANKER_ONLY
    ids = [f"m{i}" for i in range(40)]
    assert [fold_of(m) for m in ids] == [fold_of(m) for m in ids] and {fold_of(m) for m in ids} == {0, 1}
    rng = np.random.default_rng(0)
    reranker = [rng.normal(size=4) for _ in ids]
    retrieval = [rng.normal(size=4) for _ in ids]
    gold = [int(np.argmax(c)) for c in reranker]
    folds = out_of_fold(ids, reranker, retrieval, gold)
    other = [i for i, m in enumerate(ids) if fold_of(m) == 1]
    expected = fit_fusion([reranker[i] for i in other], [retrieval[i] for i in other], [gold[i] for i in other])
    assert folds[ids.index(next(m for m in ids if fold_of(m) == 0))] == expected


def test_ranked_table_orders_by_fused_score_and_keeps_retrieval_order_when_not_scored():
    groups = [RerankGroup("m1", "t", ["Q1", "Q2", "Q3"], ["a", "b", "c"], np.array([0.9, 0.8, 0.1], np.float32), 1),
              RerankGroup("m2", "t", ["Q5", "Q6"], ["a", "b"], np.array([0.7, 0.6], np.float32), 0)]
    table = ranked_table(groups, [np.array([0.0, 2.0, 2.0], np.float32), None], [Fusion(1.0, 1.0)] * 2)
    assert table.filter(pl.col("mention_id") == "m1")["qid"].to_list() == ["Q2", "Q3", "Q1"]
    assert table.filter(pl.col("mention_id") == "m2")["qid"].to_list() == ["Q5", "Q6"]
    assert table.filter(pl.col("mention_id") == "m2")["score"].null_count() == 2
    assert fused_hits1(groups[:1], [np.array([0.0, 2.0, 2.0])], Fusion(1.0, 1.0)) == 100.0
    assert fused_hits1(groups[:1], [np.array([0.0, 2.0, 2.0])], RERANKER_ONLY) == 100.0  # tie: first wins (Q2)
    predictions, outcomes = predictions_from_ranking(["m1", "m2", "m3", "m4"], {"m1", "m2", "m4"}, {"m1", "m4"},
                                                     table, {"m1": ["Q1"], "m2": ["Q5"]}, {"m1": 0.1})
    assert predictions.select("qid", "source", "reason").rows() == [
        ("Q2", "reranker", None), ("Q5", "retrieval", "confident"), (None, "fallback", "out_of_scope"),
        (None, "fallback", "no_candidates")]
    assert outcomes == {"reranker": 1, "confident": 1, "out_of_scope": 1, "no_candidates": 1}
    assert math.isnan(fused_hits1([], [], RERANKER_ONLY))


def test_a_hosted_reranker_scores_through_litellm_and_a_provider_error_is_recorded_not_fatal():
    groups = [RerankGroup("m1", "michael jordan scored", ["Q1", "Q2"], ["Jordan ; country",
                                                                      "Michael Jordan ; basketball scored"],
                          np.zeros(2, np.float32), 1),
              RerankGroup("m2", "FAIL please", ["Q1"], ["x"], np.zeros(1, np.float32), 0)]
    with rerank_server() as (api_base, requests):
        scores, calls = score_with_api(groups, RerankAPIConfig(model="cohere/stub", api_base=api_base, retries=0),
                                       progress=False)
    assert scores[0].tolist() == pytest.approx([0.1, 0.3]) and scores[1] is None
    assert [c["status"] for c in calls] == ["ok", "error"] and "internal error" in calls[1]["error"]
    asked = {r["query"]: r for r in requests}  # calls run concurrently: any order
    assert set(asked) == {"michael jordan scored", "FAIL please"}
    assert len(asked["michael jordan scored"]["documents"]) == 2


def test_scores_come_from_this_run_or_from_training_and_none_where_the_gate_kept_retrieval():
    groups = [RerankGroup(m, "t", ["Q1", "Q2"], ["a", "b"], np.zeros(2, np.float32)) for m in ("m1", "m2", "m3")]
    merged = merged_scores(groups, {"m1", "m2"}, {"m1": np.array([1.0, 2.0])}, {"m2": {"Q2": 5.0, "Q1": 4.0}})
    assert merged[0].tolist() == [1.0, 2.0] and merged[1].tolist() == [4.0, 5.0] and merged[2] is None


def test_lane_batches_are_at_most_batch_pairs_and_shared_evenly_by_the_lanes():
    assert lane_batch_size(16, 32, lanes=2) == 8  # one mention: two batches of 8, one a lane
    assert lane_batch_size(16, 32, lanes=1) == 16
    assert lane_batch_size(40, 32, lanes=2) == 20  # not 32 + 8
    assert lane_batch_size(4800, 32, lanes=2) == 32
    assert lane_batch_size(4801, 32, lanes=2) == 32  # 151 batches -> 152, of 31 or 32 pairs
    assert lane_batch_size(1, 32, lanes=2) == 1
    assert lane_batch_size(0, 32, lanes=2) == 32  # nothing to split


def test_one_mention_is_split_across_two_cpu_lanes_with_the_same_scores(monkeypatch):
    torch.manual_seed(0)  # the fresh scoring head
    model = create_cross_encoder(CrossEncoderConfig(device="cpu", precision="fp32"))
    group = RerankGroup("m", "mention: " + "context " * 9, [f"Q{i}" for i in range(16)],
                        [f"label {i}" + " fact" * i for i in range(16)], np.zeros(16, np.float32))
    batches = []
    forward = model._forward
    monkeypatch.setattr(model, "_forward", lambda tokens: batches.append(len(tokens["input_ids"])) or forward(tokens))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = model.score([group], batch_pairs=32)[0]
        assert sorted(batches) == [8, 8]
        monkeypatch.setattr(device, "CPU_LANES", 1)
        batches.clear()
        whole = model.score([group], batch_pairs=32)[0]
        assert batches == [16]
    finally:
        torch.set_num_threads(before)
    assert np.allclose(split, whole, atol=1e-4) and int(np.argmax(split)) == int(np.argmax(whole))


def test_scoring_in_two_cpu_lanes_gives_the_same_scores_in_the_same_places(monkeypatch):
    torch.manual_seed(0)  # the fresh scoring head
    model = create_cross_encoder(CrossEncoderConfig(device="cpu", precision="fp32"))
    groups = [RerankGroup(f"m{g}", f"mention {g}: " + "context " * g, [f"Q{g}{i}" for i in range(5)],
                          [f"label {i}" + " fact" * (3 * i + g) for i in range(5)], np.zeros(5, np.float32))
              for g in range(7)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # two lanes of one thread each, also on a one-core runner
    try:
        two_lanes = model.score(groups, batch_pairs=4)
        monkeypatch.setattr(device, "CPU_LANES", 1)
        one_lane = model.score(groups, batch_pairs=4)
        alone = [model.score([group], batch_pairs=64)[0] for group in groups]
    finally:
        torch.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(two_lanes, one_lane, strict=True))
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(two_lanes, alone, strict=True))


def test_pairs_are_batched_by_their_word_pieces_not_their_characters(monkeypatch):
    torch.manual_seed(0)  # the fresh scoring head
    model = create_cross_encoder(CrossEncoderConfig(device="cpu", precision="fp32"))
    # characters and word pieces disagree: 15 characters are 8 pieces, 18 characters one
    candidates = ["a b c d e f g h", "international", "q r s t u v w x", "telecommunications"]
    group = RerankGroup("m", "[ Paris ]", [f"Q{i}" for i in range(4)], candidates, np.zeros(4, np.float32))
    eight, one = model.word_pieces(["[ Paris ]"] * 2, [candidates[0], candidates[3]])
    assert eight == one + 7
    padding = []
    forward = model._forward
    monkeypatch.setattr(device, "CPU_LANES", 1)
    monkeypatch.setattr(model, "_forward",
                        lambda tokens: padding.append(int((tokens["attention_mask"] == 0).sum())) or forward(tokens))
    scores = model.score([group], batch_pairs=2)[0]
    assert padding == [0, 0]  # sorted by characters, each batch would pad its short pair
    alone = [model.score([RerankGroup("m", "[ Paris ]", ["Q"], [c], np.zeros(1, np.float32))], 2)[0][0]
             for c in candidates]
    assert np.allclose(scores, alone, atol=1e-4)  # each score back in its candidate's place


def test_training_logits_come_in_word_piece_sorted_parts_and_back_in_pair_order(monkeypatch):
    torch.manual_seed(0)  # the fresh scoring head
    model = create_cross_encoder(CrossEncoderConfig(device="cpu", precision="fp32"))
    model.model.eval()  # no dropout: parts and one batch must agree
    groups = [RerankGroup(f"m{g}", f"mention {g}: " + "context " * (5 * g), [f"Q{g}{i}" for i in range(4)],
                          [f"label {i}" + " fact" * (4 - i) for i in range(4)], np.zeros(4, np.float32), gold=g % 4)
              for g in range(6)]
    firsts = [g.mention_text for g in groups for _ in g.qids]
    seconds = [c for g in groups for c in g.candidate_texts]
    whole = model._forward(model._tokens(firsts, seconds))  # one batch, padded to the longest pair
    monkeypatch.setattr(cross_encoder, "TRAIN_PAIRS_PER_FORWARD", 5)
    parts = []
    forward = model._forward
    monkeypatch.setattr(model, "_forward", lambda tokens: parts.append(tokens["attention_mask"].sum(1).tolist())
                        or forward(tokens))
    split = model._logits(firsts, seconds)
    assert [len(p) for p in parts] == [5, 5, 5, 5, 4]  # 24 pairs in five parts
    flat = [n for p in parts for n in p]
    assert flat == sorted(flat)  # each part holds pairs of like length
    assert torch.allclose(split, whole, atol=1e-4)  # each logit back in its pair's place
    loss = model.listwise_loss(groups, negatives=3)
    loss.backward()
    expected = torch.stack([torch.logsumexp(part, 0) - part[0] for part in torch.split(
        whole.detach()[[4 * g + i for g, group in enumerate(groups)
                        for i in [group.gold] + [j for j in range(4) if j != group.gold]]], 4)]).mean()
    assert math.isclose(loss.item(), expected.item(), abs_tol=1e-4)
    assert model.model.classifier.weight.grad is not None  # gradients flow through every part
