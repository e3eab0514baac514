"""Stage `train_reranker`: the learned reranker of stage 3, trained on the train split's candidate lists,
early-stopped and fused on val (see `kgmel_core.rerank.learned`)."""

from __future__ import annotations

from prefect import task

from kgmel_core import schemas
from kgmel_core.config import CrossEncoderConfig, RerankConfig, key_config, runtime_values
from kgmel_core.factory import create_cross_encoder
from kgmel_core.rerank.fusion import Fusion
from kgmel_core.rerank.groups import Stage3Tables
from kgmel_core.rerank.learned import folds_table, scores_table, train_reranker
from kgmel_core.retrieval.device import resolve_device, resolved_precision
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage


def stage3_tables(ingest: Artifact, retrieve: Artifact, filtered: Artifact, generation: Artifact | None,
                  kb: Artifact | None = None) -> Stage3Tables:
    """The tables stage 3 reads, from the artifacts its key names (`kb`: the served KB, when it is not ingest's)."""
    return Stage3Tables(
        ingest.read("mentions"), retrieve.read("candidates"), (kb or ingest).read("entities"),
        filtered.read("filtered_triples"),
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
        tables = stage3_tables(ingest, retrieve, filtered, generation)
        (train, counts), (val, val_counts) = tables.split(config, "train"), tables.split(config, "val")
        trained = train_reranker(create_cross_encoder(ce), train, val, ce, writer.folder_path("reranker"))
        writer.write_table("reranker_history", trained.history_table(), schemas.RERANKER_HISTORY)
        writer.write_table("reranker_val_scores", scores_table(trained.val_scores, val), schemas.RERANKER_SCORES)
        writer.write_table("reranker_folds", folds_table(trained.val_fusions), schemas.RERANKER_FOLDS)
        writer.stats.update(trained.stats(), train_inputs=counts.as_stats(), val_inputs=val_counts.as_stats())
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
