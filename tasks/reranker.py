"""Stage `train_reranker`: the learned reranker of stage 3, trained on the train split's candidate lists,
early-stopped and fused on val (see `kgmel_core.rerank.learned`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import CrossEncoderConfig, RerankConfig, key_config, runtime_values
from kgmel_core.data.scope import in_scope
from kgmel_core.factory import create_cross_encoder
from kgmel_core.rerank.cross_encoder import RerankGroup
from kgmel_core.rerank.fusion import Fusion
from kgmel_core.rerank.gate import is_sent, retrieval_margins
from kgmel_core.rerank.groups import GroupCounts, build_groups
from kgmel_core.rerank.learned import folds_table, scores_table, train_reranker
from kgmel_core.retrieval.device import resolve_device, resolved_precision
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage


@dataclass
class Stage3Mentions:
    """What a ranking rerank stage works on: the mentions, those in scope, the served candidates and
    margins, the mentions the gate sends, and the in-scope mentions' groups."""

    mentions: pl.DataFrame
    scoped: pl.DataFrame
    candidates: pl.DataFrame
    margins: dict[str, float]
    sent: set[str]
    groups: list[RerankGroup]
    counts: GroupCounts


def stage3_mentions(config: RerankConfig, ingest: Artifact, retrieve: Artifact, filtered: Artifact,
                    generation: Artifact | None, kb: Artifact | None) -> Stage3Mentions:
    mentions = ingest.read("mentions")
    scoped = in_scope(mentions, config.scope)
    served = retrieve.read("candidates")
    margins = dict(retrieval_margins(served).iter_rows())
    sent = {m for m in scoped["mention_id"].to_list() if is_sent(margins.get(m, math.inf), config.margin_threshold)}
    groups, counts = stage3_groups(config, scoped, kb or ingest, retrieve, filtered, generation)
    return Stage3Mentions(mentions, scoped, served, margins, sent, groups, counts)


def stage3_groups(config: RerankConfig, mentions: pl.DataFrame, kb: Artifact, retrieve: Artifact,
                  filtered: Artifact, generation: Artifact | None):
    """The reranker's view of `mentions`: their candidate lists with the texts it reads."""
    return build_groups(
        mentions, retrieve.read("candidates"), kb.read("entities"), filtered.read("filtered_triples"),
        config.cross_encoder, config.candidates,
        generation.read("mention_generations") if generation is not None else None,
        generation.read("mention_triples") if generation is not None else None,
    )


@task(name="train_reranker", **STAGE_TASK)
def train_reranker_stage(
    ctx: PipelineContext,
    config: RerankConfig,
    ingest: Artifact,
    retrieve: Artifact,
    filtered: Artifact,
    generation: Artifact | None = None,
) -> Artifact:
    """The trained cross-encoder (files `reranker/`), its fusion with the retriever (manifest stats; the
    `rerank` stage applies it or not, `rerank.fusion`), its training history, and its scores of the val
    candidate lists (reused by `rerank`)."""
    ce = config.cross_encoder
    precision = resolved_precision(ce.precision, resolve_device(ce.device))  # `auto` differs between machines
    stage_config = {"cross_encoder": {**key_config(ce), "precision": precision}, "candidates": config.candidates}
    inputs = {"ingest": ingest, "retrieve": retrieve, "filter": filtered, "generation": generation}

    def build(writer):
        mentions = ingest.read("mentions")
        train, counts = stage3_groups(config, mentions.filter(pl.col("split") == "train"), ingest, retrieve,
                                      filtered, generation)
        val, val_counts = stage3_groups(config, mentions.filter(pl.col("split") == "val"), ingest, retrieve,
                                        filtered, generation)
        trained = train_reranker(create_cross_encoder(ce), train, val, ce, writer.folder_path("reranker"))
        history = pl.DataFrame(trained.result.history).drop("seconds")
        writer.write_table("reranker_history", history, schemas.RERANKER_HISTORY)
        writer.write_table("reranker_val_scores", scores_table(trained.val_scores, val), schemas.RERANKER_SCORES)
        writer.write_table("reranker_folds", folds_table(trained.val_fusions), schemas.RERANKER_FOLDS)
        result = trained.result
        writer.stats.update(
            fusion={"reranker": trained.fusion.reranker, "retrieval": trained.fusion.retrieval},
            best_step=result.best_step, steps=result.steps, best_val_sample_hits1=result.best_val_hits1,
            train_seconds=round(result.seconds, 1), train_groups=result.train_groups, precision=result.precision,
            val_scoring_seconds=round(trained.scoring_seconds, 1), val_mentions_scored=len(val),
            train_inputs=counts.as_stats(), val_inputs=val_counts.as_stats(),
        )
        logger().info("train_reranker: %s", writer.stats)

    return run_stage(ctx, "train_reranker", stage_config, inputs, build)


class RerankerMismatch(ValueError):
    """A reranker trained on another retriever's candidate lists (its fusion weights fit that retriever)."""


def check_pairing(ctx: PipelineContext, reranker: Artifact, retrieve: Artifact) -> None:
    """Refuse a reranker trained on candidates of a retriever other than the one that served `retrieve`."""
    trained_on = ctx.store.input(ctx.store.input(reranker, "retrieve"), "train").key
    serving = ctx.store.input(retrieve, "train").key
    if trained_on != serving:
        raise RerankerMismatch(
            f"reranker {reranker.key} was trained on the candidates of retriever {trained_on}, not of {serving} "
            "that served these mentions: its fusion weights would be wrong. Train a reranker for this retriever "
            "(full-pipeline), or serve the model version the reranker belongs to."
        )


def as_trained(ctx: PipelineContext, config: RerankConfig, reranker: Artifact) -> RerankConfig:
    """The rerank settings with the trained reranker's own: its text settings and candidate count, and
    the fact filter of the `filter` artifact it learned from (the live config's `runtime` settings – device,
    batch size – kept). A served reranker reads new mentions exactly as it was trained to, whatever
    the config says now."""
    trained = reranker.manifest["config"]
    facts = ctx.store.input(reranker, "filter").manifest["config"]
    cross_encoder = CrossEncoderConfig.model_validate({**trained["cross_encoder"],
                                                       **runtime_values(config.cross_encoder)})
    return config.model_copy(update={
        "cross_encoder": cross_encoder, "candidates": trained["candidates"],
        **{k: facts[k] for k in ("facts", "filter_n", "max_triples_per_entity")},
    })


def known_val_scores(ctx: PipelineContext, reranker: Artifact, retrieve: Artifact, filtered: Artifact):
    """The val scores and out-of-fold fusions the trained reranker kept, when this run's candidate lists and
    facts are the ones it scored (same retrieve and filter artifacts); else nothing to reuse."""
    same = (ctx.store.input(reranker, "retrieve").key == retrieve.key
            and ctx.store.input(reranker, "filter").key == filtered.key)
    if not same:
        return {}, {}
    by_mention: dict[str, dict[str, float]] = {}
    for mention_id, qid, score in reranker.read("reranker_val_scores").iter_rows():
        by_mention.setdefault(mention_id, {})[qid] = score
    folds = {m: Fusion(a, b) for m, _, a, b in reranker.read("reranker_folds").iter_rows()}
    return by_mention, folds
