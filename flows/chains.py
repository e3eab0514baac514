"""The chains of stage tasks the flows share: dataset in, retrieval, stage 3."""

from __future__ import annotations

from flows.summary import RunSummary, skip_warnings
from kgmel_core.config import PipelineConfig, RerankConfig
from storage import Artifact
from tasks import clip_bootstrap as bootstrap_tasks
from tasks import embed as embed_tasks
from tasks import index as index_tasks
from tasks import ingest as ingest_tasks
from tasks import kb as kb_tasks
from tasks import rerank as rerank_tasks
from tasks import reranker as reranker_tasks
from tasks import train as train_tasks
from tasks.common import PipelineContext


def ingest_dataset(ctx: PipelineContext, config: PipelineConfig) -> Artifact:
    """The dataset's mentions and KB; the KB from a Wikidata dump (stage `kb`) when `kb.dump` is set."""
    kb = kb_tasks.kb(ctx, config.kb) if config.kb.dump else None
    return ingest_tasks.ingest(ctx, config.dataset, kb)


def _bootstrap(ctx: PipelineContext, config: PipelineConfig, ingest: Artifact) -> Artifact | None:
    if config.encoder.bootstraps_clip:
        return bootstrap_tasks.clip_bootstrap(
            ctx, ingest, epochs=config.encoder.bootstrap_epochs, seed=config.training.seed
        )
    return None


def retrieval_chain(
    ctx: PipelineContext, config: PipelineConfig, ingest: Artifact, generation: Artifact | None
) -> dict[str, Artifact]:
    """embed -> train -> index -> retrieve (shared by full-pipeline and the ablation study)."""
    bootstrap = _bootstrap(ctx, config, ingest)
    embedded = embed_tasks.embed(ctx, config.encoder, ingest, generation, bootstrap)
    trained = train_tasks.train(ctx, config.retriever, config.training, config.encoder, ingest, embedded, generation)
    indexed = index_tasks.index(ctx, config.index, trained, ingest, embedded)
    candidates = index_tasks.retrieve(ctx, config.index, indexed, trained, ingest, embedded, generation)
    chain = {"clip_bootstrap": bootstrap} if bootstrap is not None else {}
    return {**chain, "embed": embedded, "train": trained, "index": indexed, "retrieve": candidates}


def artifact_ids(stages: dict[str, Artifact]) -> dict[str, str]:
    """`{label: "stage/key"}`: where each artifact of a run lives under the store root."""
    return {label: artifact.id for label, artifact in stages.items()}


def finish(ctx: PipelineContext, title: str, metrics: Artifact | None, notes: list[str] = ()) -> RunSummary:
    """The run's summary: published as the flow run's Prefect artifact, returned for the terminal."""
    records = ctx.run_log.records
    report = RunSummary(
        title,
        str(ctx.catalog.path),
        list(records),
        [*notes, *skip_warnings(ctx.store, records)],
        metrics.read("metrics") if metrics is not None else None,
    )
    report.publish()
    return report


def stage3(
    ctx: PipelineContext,
    config: RerankConfig,
    ingest: Artifact,
    generation: Artifact | None,
    embed: Artifact,
    retrieve: Artifact,
    *,
    train_reranker: bool = False,
    reranker: Artifact | None = None,
    kb: Artifact | None = None,
    kb_embed: Artifact | None = None,
) -> dict[str, Artifact]:
    """filter -> [train_reranker] -> rerank with the configured method. The cross-encoder is trained here
    (`train_reranker`: full-pipeline, benchmark) or given (`reranker`: the served version's, for link)."""
    filtered = rerank_tasks.filter_stage(ctx, config, ingest, generation, embed, retrieve, kb=kb, kb_embed=kb_embed)
    out = {"filter": filtered}
    if config.method == "cross_encoder":
        if train_reranker:
            reranker = out["train_reranker"] = reranker_tasks.train_reranker_stage(
                ctx, config, ingest, retrieve, filtered, generation
            )
        out["rerank"] = rerank_tasks.rerank_learned(
            ctx, config, ingest, generation, retrieve, filtered, reranker, kb=kb
        )
    elif config.method == "api":
        out["rerank"] = rerank_tasks.rerank_hosted(ctx, config, ingest, generation, retrieve, filtered, kb=kb)
    else:
        out["rerank"] = rerank_tasks.rerank(ctx, config, ingest, generation, retrieve, filtered, kb=kb)
    return out
