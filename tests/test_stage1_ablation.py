"""`bench.stage1_ablation` on real flows (small demo, fake LLM for stage 1): the facts variant the reranker
was trained with reproduces the rerank stage's own val ranking, so the other variants differ only in
their facts."""

import polars as pl
import pytest
from conftest import small_config
from fake_llm import FakeLLM, install

from bench.stage1_ablation import FactsVariant, RerankerBench, ablation
from flows.pipeline import full_pipeline
from storage import ArtifactStore

pytestmark = pytest.mark.slow
LLM = {"model": "fake/model", "timeout_s": 3, "retries": 0, "backoff_s": 0.0, "concurrency": 8}
RERANKER = {"enabled": True, "method": "cross_encoder", "candidates": 4, "facts": "filtered", "filter_n": 3,
            "cross_encoder": {"train_mentions": 48, "val_mentions": 16, "validate_every": 3, "max_length": 48,
                              "precision": "fp32"}}


def _artifact(store, result, label):
    return store.require(*result["artifacts"][label].split("/"))


def test_the_trained_facts_variant_reproduces_the_rerank_stage(prefect_harness, small_demo, tmp_path):
    install(FakeLLM())
    root = tmp_path / "artifacts"
    with_stage1 = full_pipeline(small_config(small_demo, root, generation={"enabled": True, "llm": LLM},
                                             rerank=RERANKER))
    without_stage1 = full_pipeline(small_config(small_demo, root))
    store = ArtifactStore(root)
    reranker = _artifact(store, with_stage1, "train_reranker")
    result = ablation(store, reranker, _artifact(store, without_stage1, "retrieve"), [1, 3])

    mentions = _artifact(store, with_stage1, "ingest").read("mentions")
    val = mentions.filter(pl.col("split") == "val")
    assert sorted(result.mentions["mention_id"]) == sorted(val["mention_id"])  # the fake answers every mention
    predictions = _artifact(store, with_stage1, "rerank").read("predictions")
    served = result.mentions.join(predictions, on="mention_id", maintain_order="left")
    stage_hits = (served["qid"] == served["gold_qid"]).to_numpy()
    as_trained = result.reranked[FactsVariant("filtered against generated triples, n = 3", "filtered", 3)]
    assert (as_trained[0] == stage_hits).all() and as_trained[1] == 0  # nobody fell back to context

    bench = RerankerBench(store, reranker, result.mentions)
    none, _ = bench.facts(FactsVariant("no KB facts", "none", 3))
    narrow, _ = bench.facts(FactsVariant("n = 1", "filtered", 1))
    wide, _ = bench.facts(FactsVariant("n = 3", "filtered", 3))
    assert none.height == 0 and 0 < narrow.height <= wide.height
    table = result.markdown()
    assert f"n = {val.height}" in table and "generation-free filter" in table

