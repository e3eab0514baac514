"""The `benchmark` flow: one dataset, the retriever and its ablations, one table and two plots.

Variants share the ingest artifact and, where their head texts agree, the embed artifact (and the
embedding cache across those), so a benchmark costs one embedding pass plus one training per variant.
Nothing here is registered or served. Quality is reported on val, from the candidates the index served.
"""

from __future__ import annotations

from typing import Any

import polars as pl
from prefect import flow

from flows.context import open_context
from flows.pipeline import finish, ingest_dataset, retrieval_chain
from kgmel_core.config import PipelineConfig, deep_merge
from tasks import benchmark as benchmark_tasks
from tasks import evaluate as evaluate_tasks

BENCHMARK_METRICS = ("hits@1", "hits@3", "hits@5", "hits@10", "hits@16", "mrr", "train_s", "s_per_epoch", "epochs")
LABEL_ONLY = {"encoder": {"entity_text": "label"}}
# label -> config overrides; the first is the default configuration.
VARIANTS: dict[str, dict[str, Any]] = {
    "kgmel": {},
    "kgmel w/o triples": {"retriever": {"use_triples": False}},
    "kgmel w/o gate": {"retriever": {"use_gate": False}},
    "kgmel w/o names": {"retriever": {"use_name": False}},
    "kgmel, paper architecture": {  # no name view, random init, reference top-p, the paper's lr
        "retriever": {"init": "paper", "use_name": False, "top_p_renormalize": False},
        "training": {"lr": 1e-3, "hard_negatives": 0},
    },
    "kgmel, label-only entities": LABEL_ONLY,
    "kgmel w/o triples, label-only entities": deep_merge(LABEL_ONLY, {"retriever": {"use_triples": False}}),
}


def variant_config(config: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    return PipelineConfig.model_validate(deep_merge(config.model_dump(), overrides))


def applicable(label: str, overrides: dict[str, Any], has_triples: bool, has_descriptions: bool) -> str | None:
    """Why a variant is skipped on this dataset (it would repeat another one exactly), or None."""
    if not has_triples and not overrides.get("retriever", {}).get("use_triples", True):
        return f"{label}: skipped, the KB has no triples (same as with them)"
    if not has_descriptions and overrides.get("encoder", {}).get("entity_text") == "label":
        return f"{label}: skipped, the KB has no descriptions (label-only is the default here)"
    return None


@flow(name="benchmark", log_prints=True)
def benchmark(config: PipelineConfig, variants: list[str] | None = None) -> dict[str, Any]:
    """Zero-shot text, the KGMEL retriever and its ablations on one dataset; see the module docstring."""
    ctx = open_context(config, "benchmark")
    ingested = ingest_dataset(ctx, config)
    has_triples = ingested.tables["kb_triples"] > 0
    has_descriptions = ingested.read("entities")["description"].str.len_chars().sum() > 0
    notes, results, label_only = [], {}, set()
    for label, overrides in VARIANTS.items():
        if variants and label not in variants:
            continue
        if why := applicable(label, overrides, has_triples, has_descriptions):
            notes.append(why)
            continue
        variant = variant_config(config, overrides)
        chain = retrieval_chain(ctx, variant, ingested, None)
        evaluated = evaluate_tasks.evaluate(
            ctx, ingested, chain["embed"], chain["retrieve"], label=label, splits=["val"]
        )
        results[label] = (chain["train"], evaluated)
        if variant.encoder.entity_text == "label":
            label_only.add(label)
    report_artifact = benchmark_tasks.benchmark(ctx, config.dataset.name, results, label_only)
    files = ", ".join(str(report_artifact.file(name)) for name in ("training_curves.png", "hits_at_k.png"))
    report = finish(ctx, f"kgmel benchmark: {config.dataset.name} (val)", None, [*notes, f"plots: {files}"])
    report.metrics = report_artifact.read("benchmark").drop("dataset")
    report.shown = BENCHMARK_METRICS
    return {"report": report, "benchmark": report_artifact.id, "root": ctx.store.url,
            "table": report.metrics.with_columns(pl.lit(config.dataset.name).alias("dataset"))}
