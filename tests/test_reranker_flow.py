"""The learned reranker in the real flows, on the small demo dataset: trained and fused by full-pipeline,
registered with its retriever, served by `link`, and never paired with another retriever's candidates."""

import dataclasses

import polars as pl
import pytest
from conftest import small_config
from rerank_stub import rerank_server

from flows.pipeline import full_pipeline, link, served_nil_model
from kgmel_core.config import RerankAPIConfig
from storage import ArtifactStore
from tasks import rerank as rerank_tasks
from tasks.common import PipelineContext
from tasks.nil import NilModelMismatch
from tasks.reranker import RerankerMismatch

pytestmark = pytest.mark.slow
SMALL_RERANKER = {"rerank": {"enabled": True, "method": "cross_encoder", "candidates": 4, "facts": "context",
                             "filter_n": 3, "cross_encoder": {"train_mentions": 48, "val_mentions": 16,
                                                              "validate_every": 3, "max_length": 48}}}


def _artifact(store, ids, label):
    return store.require(*ids[label].split("/"))


@pytest.fixture(scope="module")
def served(prefect_harness, small_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("reranked")
    config = small_config(small_demo, root, **SMALL_RERANKER)
    return config, full_pipeline(config)


def test_full_pipeline_trains_fuses_and_ranks_every_mention(served):
    config, result = served
    assert list(result["artifacts"])[-5:] == ["filter", "train_reranker", "rerank", "evaluate", "fit_nil"]
    store = ArtifactStore(config.artifacts)
    ids = result["artifacts"]
    mentions = _artifact(store, ids, "ingest").read("mentions")
    ranked = _artifact(store, ids, "rerank").read("reranked")
    assert ranked.group_by("mention_id").len()["len"].unique().to_list() == [4]
    assert ranked["mention_id"].n_unique() == mentions.height  # no margin threshold: every mention reranked
    predictions = _artifact(store, ids, "rerank").read("predictions")
    assert set(predictions["source"]) == {"reranker"}
    trained = _artifact(store, ids, "train_reranker")
    assert {"config.json", "model.safetensors"} <= {f.split("/")[-1] for f in trained.manifest["files"]}
    assert set(trained.manifest["stats"]["fusion"]) == {"reranker", "retrieval"}
    val_ids = set(mentions.filter(pl.col("split") == "val")["mention_id"])
    assert set(trained.read("reranker_folds")["mention_id"]) == val_ids  # out-of-fold fusion for each val mention
    metrics = _artifact(store, ids, "evaluate").read("metrics")
    assert {"kgmel + reranker", "kgmel + rerank", "kgmel top-1 (same mentions)"} <= set(metrics["method"])
    version = store.models.require(config.model).serving
    assert version.reranker == trained.key


def test_link_serves_the_promoted_versions_reranker(served, prefect_harness, small_demo):
    config, result = served
    records = [{"id": "n1", "sentence": "A portrait of someone.", "mention": ["someone"]}]
    linked = link(config, mentions=records)
    store = ArtifactStore(config.artifacts)
    reranked = _artifact(store, linked["artifacts"], "rerank")
    assert store.input(reranked, "train_reranker").key == store.models.require(config.model).serving.reranker
    assert linked["predictions"]["source"].to_list() == ["reranker"]
    # a live config that says otherwise does not change how the served reranker reads (K, texts)
    other = config.model_copy(update={"rerank": config.rerank.model_copy(update={
        "candidates": 2, "cross_encoder": config.rerank.cross_encoder.model_copy(update={"max_facts": 0})})})
    again = link(other, mentions=records)
    assert _artifact(store, again["artifacts"], "rerank").read("reranked").height == 4


def test_a_reranker_is_never_paired_with_another_retrievers_candidates(served, prefect_harness, small_demo):
    config, result = served
    other = small_config(small_demo, config.artifacts, **SMALL_RERANKER, training={"epochs": 4, "batch_size": 32,
                                                                                    "patience": 2, "seed": 1})
    newer = full_pipeline(other)  # v2: another retriever with its own reranker; v1 stays served
    store = ArtifactStore(config.artifacts)
    state = store.models.require(config.model)
    assert [v.number for v in state.versions] == [1, 2] and state.served == 1
    assert state.version(2).reranker != state.version(1).reranker
    old_reranker = store.require("train_reranker", state.version(1).reranker)
    ids = newer["artifacts"]
    ctx = PipelineContext(store, run_log=None)
    with pytest.raises(RerankerMismatch, match="trained on the candidates of retriever"):
        rerank_tasks.rerank_learned.fn(ctx, other.rerank, _artifact(store, ids, "ingest"), None,
                                       _artifact(store, ids, "retrieve"), _artifact(store, ids, "filter"),
                                       old_reranker)
    # nor is a NIL model (its threshold fits v1's fused scores), even where the registry pairs them
    assert state.version(1).nil and state.version(2).nil and state.version(1).nil != state.version(2).nil
    newer_reranker = store.require("train_reranker", state.version(2).reranker)
    mispaired = dataclasses.replace(state.version(2), nil=state.version(1).nil)
    with pytest.raises(NilModelMismatch, match="fitted on the scores of retriever"):
        served_nil_model(ctx, mispaired, config.model, _artifact(store, ids, "retrieve"), newer_reranker)
    store.models.promote(config.model, 2)
    with_nil = config.model_copy(update={"nil": config.nil.model_copy(update={"enabled": True})})
    linked = link(with_nil, mentions=[{"id": "n2", "sentence": "Someone else.", "mention": ["someone"]}])
    reranked = _artifact(store, linked["artifacts"], "rerank")
    assert store.input(reranked, "train_reranker").key == state.version(2).reranker
    decided = _artifact(store, linked["artifacts"], "decide_nil")
    assert store.input(decided, "fit_nil").key == state.version(2).nil
    assert linked["nil_decisions"]["nil_score"].null_count() == 0  # the reranked list carries every feature


def test_link_with_a_hosted_reranker_ranks_by_its_scores_and_counts_a_provider_error(served, prefect_harness):
    config, _ = served
    with rerank_server() as (api_base, requests):
        hosted = config.model_copy(update={"rerank": config.rerank.model_copy(update={
            "method": "api", "api": RerankAPIConfig(model="cohere/stub", api_base=api_base, retries=0)})})
        linked = link(hosted, mentions=[
            {"id": "h1", "sentence": "A portrait of someone.", "mention": ["someone"]},
            {"id": "h2", "sentence": "FAIL to rank this.", "mention": ["this"]},
        ])
    predictions = linked["predictions"].sort("mention_id")
    assert predictions.select("source", "reason").rows() == [("api", None), ("fallback", "call_failed")]
    store = ArtifactStore(config.artifacts)
    reranked = _artifact(store, linked["artifacts"], "rerank")
    assert reranked.manifest["stats"]["calls_failed"] == 1 and len(requests) == 2
    calls = reranked.read("llm_calls")
    assert calls["status"].to_list().count("error") == 1
