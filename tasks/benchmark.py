"""Stage `benchmark`: one table and its plots from the evaluate and train artifacts of a dataset's variants.

Every number comes from the variants' own artifacts: HITS@k / MRR from `evaluate` (the candidates the
index served), training time and curves from `train`. The plots are PNG files inside the artifact.
"""

from __future__ import annotations

import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.benchmark import VariantResult, benchmark_table
from kgmel_core.metrics import HITS_AT
from kgmel_core.plots import hits_at_k, nil_precision_recall, training_curves
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, run_stage


def variant_result(label: str, train: Artifact, evaluate: Artifact, label_only: bool) -> VariantResult:
    is_reranker = train.stage == "train_reranker"
    stats = dict(train.manifest["stats"], seconds=train.manifest["seconds"])
    return VariantResult(
        label, evaluate.read("metrics").filter(pl.col("split") == "val"), stats, is_reranker, label_only,
        history=None if is_reranker else train.read("training_history"),
        nil_outcomes=evaluate.read("nil_outcomes") if "nil_outcomes" in evaluate.tables else None,
    )


@task(name="benchmark", **STAGE_TASK)
def benchmark(
    ctx: PipelineContext, dataset: str, variants: dict[str, tuple[Artifact, Artifact]], label_only: set[str]
) -> Artifact:
    """`variants`: label -> (train or train_reranker, evaluate) artifacts; `label_only`: labels whose
    entity head text is the label alone (their zero-shot baseline is reported separately)."""
    inputs = {}
    for label, (train, evaluate) in variants.items():
        inputs[f"train:{label}"], inputs[f"evaluate:{label}"] = train, evaluate

    def build(writer):
        results = [variant_result(label, *pair, label in label_only) for label, pair in variants.items()]
        table, curves, nil_curves = benchmark_table(dataset, results)
        writer.write_table("benchmark", table, schemas.BENCHMARK)
        if curves is not None:  # retriever variants
            curves = curves.with_columns(pl.col("val_hits1").fill_null(float("nan")))
            training_curves(curves, writer.file_path("training_curves.png"),
                            f"{dataset}: training (val on the whole KB)")
        if nil_curves is not None:
            nil_precision_recall(nil_curves, writer.file_path("nil_precision_recall.png"),
                                 f"{dataset}: out-of-KB val mentions (NIL made by withholding gold entities)")
        ks = table.filter(pl.col("metric").is_in([f"hits@{k}" for k in HITS_AT]) & pl.col("value").is_not_nan())
        ks = ks.select("method", k=pl.col("metric").str.strip_prefix("hits@").cast(pl.Int64), hits="value")
        hits_at_k(ks, writer.file_path("hits_at_k.png"), f"{dataset}: val HITS@k by method")
        writer.stats.update(dataset=dataset, variants=list(variants))

    return run_stage(ctx, "benchmark", {"dataset": dataset, "label_only": sorted(label_only)}, inputs, build)
