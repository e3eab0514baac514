"""Stage `benchmark`: one table and two plots from the evaluate and train artifacts of a dataset's variants.

Every number comes from the variants' own artifacts: HITS@k / MRR from `evaluate` (the candidates the
index served), training time and curves from `train`. The plots are PNG files inside the artifact.
"""

from __future__ import annotations

import statistics

import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.metrics import HITS_AT
from kgmel_core.nil import precision_recall_curve
from kgmel_core.plots import hits_at_k, nil_precision_recall, training_curves
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, run_stage

# Frozen-encoder baselines every evaluate artifact holds; those built on head texts change with them.
ZERO_SHOT = ("zero-shot text", "zero-shot names", "zero-shot text + names")


def _rows(dataset: str, method: str, values: dict[str, float]) -> list[dict]:
    return [{"dataset": dataset, "method": method, "split": "val", "metric": k, "value": float(v)}
            for k, v in values.items()]


def _reranker_values(metrics: pl.DataFrame, trained: Artifact) -> dict[str, float]:
    """A reranker variant's row: its ranked list's metrics, its paired gain over the retriever's top-1 on
    the same mentions, and its cost (training seconds; ms per mention, from scoring every val mention)."""
    def of(method: str) -> dict[str, float]:
        return dict(metrics.filter(pl.col("method") == method).select("metric", "value").iter_rows())

    values = of("kgmel + reranker")
    gain = of("kgmel + rerank")
    stats = trained.manifest["stats"]
    values.update(gain=gain["gain_vs_top1"], ci95=gain["gain_ci95"], train_s=float(stats["train_seconds"]),
                  ms_per_mention=1000 * stats["val_scoring_seconds"] / max(1, stats["val_mentions_scored"]))
    return values


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
        rows, history, nil_curves, zero_shot_done = [], [], [], set()
        for label, (train, evaluate) in variants.items():
            metrics = evaluate.read("metrics").filter(pl.col("split") == "val")
            out_of_kb = metrics.filter(pl.col("method").str.ends_with("out-of-KB"))
            if out_of_kb.height:
                rows += _rows(dataset, f"{label}, out-of-KB", dict(out_of_kb.select("metric", "value").iter_rows()))
                curve = precision_recall_curve(evaluate.read("nil_outcomes"))
                nil_curves.append(curve.with_columns(variant=pl.lit(label)))
            for method in ZERO_SHOT:
                shown = method
                if label in label_only and method != "zero-shot names":
                    shown += " (label-only entities)"
                if shown not in zero_shot_done:
                    values = metrics.filter(pl.col("method") == method)
                    rows += _rows(dataset, shown, dict(values.select("metric", "value").iter_rows()))
                    zero_shot_done.add(shown)
            if train.stage == "train_reranker":
                rows += _rows(dataset, label, _reranker_values(metrics, train))
                continue
            values = dict(metrics.filter(pl.col("method") == label).select("metric", "value").iter_rows())
            stats = train.manifest["stats"]
            values.update(
                train_s=float(train.manifest["seconds"]),
                s_per_epoch=statistics.median(stats["epoch_seconds"]),
                epochs=float(stats["epochs_run"]),
                best_epoch=float(stats["best_epoch"]),
            )
            rows += _rows(dataset, label, values)
            history.append(train.read("training_history").with_columns(variant=pl.lit(label)))
        table = pl.DataFrame(rows, schema=pl.Schema(schemas.BENCHMARK))
        writer.write_table("benchmark", table, schemas.BENCHMARK)
        if history:  # retriever variants
            curves = pl.concat(history, how="diagonal_relaxed")
            curves = curves.with_columns(pl.col("val_hits1").fill_null(float("nan")))
            training_curves(curves, writer.file_path("training_curves.png"),
                            f"{dataset}: training (val on the whole KB)")
        if nil_curves:
            nil_precision_recall(pl.concat(nil_curves), writer.file_path("nil_precision_recall.png"),
                                 f"{dataset}: out-of-KB val mentions (NIL made by withholding gold entities)")
        ks = table.filter(pl.col("metric").is_in([f"hits@{k}" for k in HITS_AT]) & pl.col("value").is_not_nan())
        ks = ks.select("method", k=pl.col("metric").str.strip_prefix("hits@").cast(pl.Int64), hits="value")
        hits_at_k(ks, writer.file_path("hits_at_k.png"), f"{dataset}: val HITS@k by method")
        writer.stats.update(dataset=dataset, variants=list(variants))

    return run_stage(ctx, "benchmark", {"dataset": dataset, "label_only": sorted(label_only)}, inputs, build)
