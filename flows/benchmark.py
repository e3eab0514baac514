"""The `benchmark` flow: one dataset, the retriever and its ablations, the learned reranker on top of the
default retriever, one table and two plots.

Retriever variants share the ingest artifact and, where their head texts agree, the embed artifact (and
the embedding cache across those), so a benchmark costs one embedding pass plus one training per
variant; reranker variants share the default retriever's candidates. Nothing here is registered or
served. Quality is reported on val, from the candidates the index served and the lists stage 3 ranked.
"""

from __future__ import annotations

from typing import Any

import polars as pl
from prefect import flow

from flows.chains import finish, ingest_dataset, retrieval_chain, stage3
from flows.context import open_context
from kgmel_core.config import LLMScope, PipelineConfig
from kgmel_core.variants import VARIANTS, missing, variants_for
from tasks import benchmark as benchmark_tasks
from tasks import evaluate as evaluate_tasks

BENCHMARK_METRICS = ("hits@1", "hits@3", "hits@5", "hits@10", "hits@16", "mrr", "gain", "ci95", "train_s",
                     "s_per_epoch", "epochs", "ms_per_mention")


def data_holds(ingested) -> set[str]:
    """What the dataset holds that some variant ablates."""
    entities, mentions = ingested.read("entities"), ingested.read("mentions")
    held = {"triples"} if ingested.tables["kb_triples"] else set()
    if entities["description"].str.len_chars().sum():
        held.add("descriptions")
    if entities["image_sha256"].drop_nulls().len() or mentions["image_sha256"].drop_nulls().len():
        held.add("images")
    return held


@flow(name="benchmark", log_prints=True)
def benchmark(config: PipelineConfig, variants: list[str] | None = None) -> dict[str, Any]:
    """Zero-shot baselines, the KGMEL retriever, its ablations and the reranker on one dataset; see the
    module docstring. `variants`: labels of `kgmel_core.variants.VARIANTS` (default: its benchmark set)."""
    ctx = open_context(config, "benchmark")
    ingested = ingest_dataset(ctx, config)
    held = data_holds(ingested)
    notes, results, label_only = [], {}, set()
    for label in variants or list(variants_for("benchmark")):
        variant = VARIANTS[label]
        if why := missing(variant, held):
            notes.append(f"{label}: skipped, {why} (it would repeat another row)")
            continue
        chosen = variant.config(config)
        if variant.stage == "retriever":
            chain = retrieval_chain(ctx, chosen, ingested, None)
            evaluated = evaluate_tasks.evaluate(
                ctx, ingested, chain["embed"], chain["retrieve"], label=label, splits=["val"], nil=config.nil
            )
            results[label] = (chain["train"], evaluated)
            if chosen.encoder.entity_text == "label":
                label_only.add(label)
            continue
        chain = retrieval_chain(ctx, config, ingested, None)  # the default retriever's candidates
        val_only = chosen.rerank.model_copy(update={"scope": LLMScope(splits=["val"])})  # what the table reports
        third = stage3(ctx, val_only, ingested, None, chain["embed"], chain["retrieve"], train_reranker=True)
        evaluated = evaluate_tasks.evaluate(
            ctx, ingested, chain["embed"], chain["retrieve"], third["rerank"], label="kgmel", splits=["val"],
            nil=config.nil,
        )
        results[label] = (third["train_reranker"], evaluated)
    report_artifact = benchmark_tasks.benchmark(ctx, config.dataset.name, results, label_only)
    plots = [name for name in ("training_curves.png", "hits_at_k.png", "nil_precision_recall.png")
             if name in report_artifact.manifest["files"]]
    files = ", ".join(str(report_artifact.file(name)) for name in plots)
    report = finish(ctx, f"kgmel benchmark: {config.dataset.name} (val)", None, [*notes, f"plots: {files}"])
    report.metrics = report_artifact.read("benchmark").drop("dataset")
    report.shown = BENCHMARK_METRICS
    return {"report": report, "benchmark": report_artifact.id, "root": ctx.store.url,
            "table": report.metrics.with_columns(pl.lit(config.dataset.name).alias("dataset"))}
