"""Stages `fit_nil` and `decide_nil`: the NIL model fitted with a model version, and applied when linking."""

from __future__ import annotations

import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import NilConfig
from kgmel_core.nil import NilModel, fit_served_model, nil_decisions, train_golds, val_lists, with_name_match
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage


class NilModelMismatch(ValueError):
    """A NIL model fitted on another model version's lists (its weights and threshold fit those scores)."""


def final_lists(retrieve: Artifact, rerank: Artifact | None) -> pl.DataFrame:
    """What ranks last: the learned reranker's lists where stage 3 wrote them, else the retriever's."""
    if rerank is not None and "reranked" in rerank.tables:
        return rerank.read("reranked")
    return retrieve.read("candidates")


@task(name="fit_nil", **STAGE_TASK)
def fit_nil(ctx: PipelineContext, config: NilConfig, ingest: Artifact, retrieve: Artifact,
            rerank: Artifact | None = None) -> Artifact:
    """The NIL model of this run's final val lists. Too few val mentions to make NIL ones: an empty
    `nil_model` table, the reason in the stats (the version is then registered without a NIL model)."""

    def build(writer):
        mentions = ingest.read("mentions")
        train_gold = train_golds(mentions)
        val = mentions.filter(pl.col("split") == "val")
        lists = val_lists(final_lists(retrieve, rerank), val, ingest.read("entities"))
        try:
            model, stats = fit_served_model(lists, val, train_gold, config.share, config.seed, config.max_in_kb_cost)
        except ValueError as exc:
            writer.write_table("nil_model", pl.DataFrame(schema=pl.Schema(schemas.NIL_MODEL)), schemas.NIL_MODEL)
            writer.stats.update(skipped=str(exc))
            logger().warning("fit_nil: no NIL model for this version: %s", exc)
            return
        writer.write_table("nil_model", model.table(), schemas.NIL_MODEL)
        writer.stats.update(stats, features=list(model.features))

    inputs = {"ingest": ingest, "retrieve": retrieve, "rerank": rerank}
    stage_config = config.fitting()
    return run_stage(ctx, "fit_nil", stage_config, inputs, build)


def check_pairing(ctx: PipelineContext, fitted: Artifact, retrieve: Artifact, reranker: Artifact | None) -> None:
    """Refuse a NIL model fitted on the lists of another retriever or reranker than the ones serving now."""
    fitted_retrieve = ctx.store.input(fitted, "retrieve")
    fitted_on = ctx.store.input(fitted_retrieve, "train").key
    serving = ctx.store.input(retrieve, "train").key
    problem = None
    if fitted_on != serving:
        problem = f"retriever {fitted_on}, not {serving} that served these mentions"
    elif "rerank" in fitted.manifest["inputs"]:
        fitted_rerank = ctx.store.input(fitted, "rerank")
        fitted_reranker = fitted_rerank.manifest["inputs"].get("train_reranker", {}).get("key")
        if fitted_reranker and (reranker is None or reranker.key != fitted_reranker):
            problem = f"reranker {fitted_reranker}, not {reranker.key if reranker else 'none'} that ranks now"
    if problem:
        raise NilModelMismatch(
            f"NIL model {fitted.key} was fitted on the scores of {problem}: its threshold would be wrong. "
            "Serve the model version it belongs to, or run full-pipeline to fit one for this version."
        )


@task(name="decide_nil", **STAGE_TASK)
def decide_nil(ctx: PipelineContext, config: NilConfig, fitted: Artifact, ingest: Artifact, kb: Artifact,
               retrieve: Artifact, rerank: Artifact | None = None) -> Artifact:
    """P(NIL) and the decision for every mention of `ingest`, from its final list and the served NIL model
    (`config.threshold` overrides the model's own)."""

    def build(writer):
        model = NilModel.from_table(fitted.read("nil_model"))
        mentions = ingest.read("mentions")
        lists = with_name_match(final_lists(retrieve, rerank), mentions, kb.read("entities"))
        decisions = nil_decisions(model, lists, mentions["mention_id"].to_list(), config.threshold)
        writer.write_table("nil_decisions", decisions, schemas.NIL_DECISIONS)
        undecided = int(decisions["nil_score"].null_count())
        writer.stats.update(mentions=decisions.height, nil=int(decisions["nil"].sum()), undecided=undecided,
                            threshold=model.threshold if config.threshold is None else config.threshold)
        if undecided:
            logger().warning("decide_nil: %d mentions undecided (their lists lack a score the NIL model reads: "
                             "not reranked)", undecided)

    inputs = {"fit_nil": fitted, "ingest": ingest, "kb": kb, "retrieve": retrieve, "rerank": rerank}
    return run_stage(ctx, "decide_nil", {"threshold": config.threshold}, inputs, build)
