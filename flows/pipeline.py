"""The flows. Each is a chain of stage tasks; skipping comes from artifact keys (see tasks.common)."""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import polars as pl
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError

from flows.context import open_context
from kgmel_core.config import PipelineConfig, load_config
from storage import Artifact
from tasks import embed as embed_tasks
from tasks import evaluate as evaluate_tasks
from tasks import ingest as ingest_tasks
from tasks import llm_stages, retrieval
from tasks.common import PipelineContext


def _bootstrap(ctx: PipelineContext, config: PipelineConfig, ingest: Artifact) -> Artifact | None:
    if config.encoder.clip_pretrained == embed_tasks.TRAIN_ON_DATASET:
        return embed_tasks.clip_bootstrap(
            ctx, ingest, epochs=config.encoder.bootstrap_epochs, seed=config.training.seed
        )
    return None


def retrieval_chain(
    ctx: PipelineContext, config: PipelineConfig, ingest: Artifact, generation: Artifact | None
) -> dict[str, Artifact]:
    """embed -> train -> index -> retrieve (shared by full-pipeline and the ablation study)."""
    bootstrap = _bootstrap(ctx, config, ingest)
    embedded = embed_tasks.embed(ctx, config.encoder, ingest, generation, bootstrap)
    trained = retrieval.train(ctx, config.retriever, config.training, config.encoder, ingest, embedded, generation)
    indexed = retrieval.index(ctx, config.index, config.encoder, trained, ingest, embedded)
    candidates = retrieval.retrieve(ctx, config.index, config.encoder, indexed, trained, ingest, embedded, generation)
    chain = {"clip_bootstrap": bootstrap} if bootstrap is not None else {}
    return {**chain, "embed": embedded, "train": trained, "index": indexed, "retrieve": candidates}


def artifact_ids(stages: dict[str, Artifact]) -> dict[str, str]:
    """`{label: "stage/key"}`: where each artifact of a run lives under the store root."""
    return {label: f"{artifact.stage}/{artifact.key}" for label, artifact in stages.items()}


def publish_summary(ctx: PipelineContext, title: str, metrics: Artifact | None) -> str:
    """A markdown summary (metrics, per-stage rows/time/cache hits, catalog path) as a Prefect artifact."""
    lines = [
        f"# {title}",
        "",
        f"DuckDB catalog: `{ctx.catalog.path}`",
        "",
        "| stage | key | cache hit | rows | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.stage} | `{r.key}` | {'yes' if r.cache_hit else 'no'} | {r.rows} | {r.seconds:.1f} |"
        for r in ctx.run_log.records
    ]
    if metrics is not None:
        table = evaluate_tasks.format_metrics(metrics.read("metrics"))
        lines += ["", "## Metrics", "", "```", table, "```"]
    markdown = "\n".join(lines)
    with contextlib.suppress(MissingContextError):
        create_markdown_artifact(markdown, key="kgmel-run-summary", description=title)
    return markdown


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """ingest -> [generate] -> embed -> train -> index -> retrieve -> [filter -> rerank] -> evaluate."""
    ctx = open_context(config, "full-pipeline")
    ingested = ingest_tasks.ingest(ctx, config.dataset)
    stages: dict[str, Artifact] = {"ingest": ingested}
    generation = None
    if config.generation.enabled:
        generation = stages["generate"] = llm_stages.generate(ctx, config.generation, ingested)
    retriever_generation = generation if config.retriever.use_mention_triples else None
    chain = retrieval_chain(ctx, config, ingested, retriever_generation)
    stages.update(chain)
    reranked = None
    if config.rerank.enabled and generation is not None:
        embedded = chain["embed"]
        if retriever_generation is None:  # filtering needs the generated triples' embeddings too
            embedded = stages["embed_generated"] = embed_tasks.embed(
                ctx, config.encoder, ingested, generation, chain.get("clip_bootstrap")
            )
        filtered = stages["filter"] = llm_stages.filter_stage(
            ctx, config.rerank, ingested, generation, embedded, chain["retrieve"]
        )
        reranked = stages["rerank"] = llm_stages.rerank(
            ctx, config.rerank, ingested, generation, chain["retrieve"], filtered
        )
    metrics = stages["evaluate"] = evaluate_tasks.evaluate(
        ctx, config.encoder, ingested, chain["embed"], chain["retrieve"], reranked
    )
    summary = publish_summary(ctx, "kgmel full-pipeline", metrics)
    return {
        "artifacts": artifact_ids(stages),
        "summary": summary,
        "root": str(ctx.store.root),
    }


ABLATIONS: dict[str, dict[str, Any]] = {
    "kgmel": {},
    "kgmel w/o triples": {"use_triples": False},
    "kgmel w/o image": {"use_image": False},
    "kgmel w/o gate": {"use_gate": False},
}


@flow(name="ablations", log_prints=True)
def ablations(config: PipelineConfig) -> dict[str, Any]:
    """Train and evaluate the retriever and its ablations on shared ingest/embed artifacts."""
    ctx = open_context(config, "ablations")
    ingested = ingest_tasks.ingest(ctx, config.dataset)
    results = {}
    for label, switches in ABLATIONS.items():
        variant = config.model_copy(update={"retriever": config.retriever.model_copy(update=switches)})
        chain = retrieval_chain(ctx, variant, ingested, None)
        results[label] = evaluate_tasks.evaluate(
            ctx, variant.encoder, ingested, chain["embed"], chain["retrieve"], label=label
        )
    combined = pl.concat([a.read("metrics") for a in results.values()]).unique(maintain_order=True)
    table = evaluate_tasks.format_metrics(combined)
    publish_summary(ctx, "kgmel ablations", None)
    return {"table": table, "metrics": combined}


def current_retriever(ctx: PipelineContext, train_key: str | None) -> tuple[Artifact, Artifact | None]:
    """The trained retriever to reuse (the given key, else the newest) and the CLIP stand-in it was
    trained with, so re-indexing embeds new rows with exactly the encoder the retriever knows."""
    trained = ctx.store.require("train", train_key) if train_key else ctx.store.latest("train")
    if trained is None:
        raise RuntimeError(f"no trained retriever under {ctx.store.root}: run kgmel/full-pipeline first")
    embedded = ctx.store.require("embed", trained.manifest["inputs"]["embed"])
    bootstrap_key = embedded.manifest["inputs"].get("clip_bootstrap")
    return trained, ctx.store.require("clip_bootstrap", bootstrap_key) if bootstrap_key else None


@flow(name="reindex-kb", log_prints=True)
def reindex_kb(config: PipelineConfig, train_key: str | None = None) -> dict[str, Any]:
    """Re-read the KB, embed only new or changed strings/images, rebuild the index with the current
    retriever (no retraining). Meant to run on a schedule."""
    ctx = open_context(config, "reindex-kb")
    trained, bootstrap = current_retriever(ctx, train_key)
    ingested = ingest_tasks.ingest(ctx, config.dataset)
    embedded = embed_tasks.embed(ctx, config.encoder, ingested, None, bootstrap)
    indexed = retrieval.index(ctx, config.index, config.encoder, trained, ingested, embedded)
    summary = publish_summary(ctx, "kgmel reindex-kb", None)
    return {
        "artifacts": artifact_ids({"train": trained, "ingest": ingested, "embed": embedded, "index": indexed}),
        "summary": summary,
        "root": str(ctx.store.root),
    }


@flow(name="link", log_prints=True)
def link(
    config: PipelineConfig,
    mentions_file: str | None = None,
    mentions: list[dict] | None = None,
    image_dir: str | None = None,
    index_key: str | None = None,
) -> dict[str, Any]:
    """Link new mentions against the existing index, without retraining:
    ingest_link -> [generate] -> embed -> retrieve -> [filter -> rerank] -> predictions."""
    ctx = open_context(config, "link")
    indexed = ctx.store.require("index", index_key) if index_key else ctx.store.latest("index")
    if indexed is None:
        raise RuntimeError(f"no index under {ctx.store.root}: run kgmel/full-pipeline or kgmel/reindex-kb first")
    trained, bootstrap = current_retriever(ctx, indexed.manifest["inputs"]["train"])
    kb = ctx.store.require("ingest", indexed.manifest["inputs"]["ingest"])
    kb_embed = ctx.store.require("embed", indexed.manifest["inputs"]["embed"])
    ingested = ingest_tasks.ingest_link_mentions(ctx, mentions_file, mentions, image_dir)
    stages: dict[str, Artifact] = {"ingest_link": ingested, "index": indexed}
    generation = None
    if config.generation.enabled:
        generation = stages["generate"] = llm_stages.generate(ctx, config.generation, ingested)
    embedded = stages["embed"] = embed_tasks.embed(ctx, config.encoder, ingested, generation, bootstrap)
    retriever_generation = generation if config.retriever.use_mention_triples else None
    candidates = stages["retrieve"] = retrieval.retrieve(
        ctx, config.index, config.encoder, indexed, trained, ingested, embedded, retriever_generation
    )
    predictions = None
    if config.rerank.enabled and generation is not None:
        filtered = stages["filter"] = llm_stages.filter_stage(
            ctx, config.rerank, ingested, generation, embedded, candidates, kb=kb, kb_embed=kb_embed
        )
        reranked = stages["rerank"] = llm_stages.rerank(
            ctx, config.rerank, ingested, generation, candidates, filtered, kb=kb
        )
        predictions = reranked.read("predictions")
    summary = publish_summary(ctx, "kgmel link", None)
    return {
        "artifacts": artifact_ids(stages),
        "candidates": candidates.read("candidates"),
        "predictions": predictions,
        "summary": summary,
        "root": str(ctx.store.root),
    }


@flow(name="kgmel", log_prints=True)
def kgmel(
    job: Literal["full-pipeline", "reindex-kb", "link", "ablations"] = "full-pipeline",
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    mentions_file: str | None = None,
    image_dir: str | None = None,
) -> dict:
    """The deployable entry flow. Deployments `kgmel/full-pipeline`, `kgmel/reindex-kb`, `kgmel/link`
    are this flow with `job` preset, so `prefect deployment run kgmel/<job>` is what users type."""
    config = load_config(config_path, overrides)  # validated by pydantic before any work starts
    if job == "full-pipeline":
        result = full_pipeline(config)
    elif job == "reindex-kb":
        result = reindex_kb(config)
    elif job == "link":
        if not mentions_file:
            raise ValueError("job 'link' needs mentions_file")
        result = link(config, mentions_file=mentions_file, image_dir=image_dir)
        result.pop("candidates")
        result.pop("predictions")
    else:
        result = ablations(config)
        result.pop("metrics")
    return result
