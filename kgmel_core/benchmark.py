"""The benchmark table: one row per variant of a dataset (val), from what its evaluate and train stages
recorded, with the zero-shot baselines once and the out-of-KB rows beside them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import polars as pl

from kgmel_core import schemas
from kgmel_core.nil import precision_recall_curve

# Frozen-encoder baselines every evaluate artifact holds; those built on head texts change with them.
ZERO_SHOT = ("zero-shot text", "zero-shot names", "zero-shot text + names")


@dataclass
class VariantResult:
    """One variant's evaluate metrics (val), its training record (a retriever's `train` stats with the
    stage's seconds, or a reranker's `train_reranker` stats), and what its plots need."""

    label: str
    metrics: pl.DataFrame
    train_stats: dict
    is_reranker: bool
    label_only: bool = False  # entity head text is the label alone: its zero-shot rows are its own
    history: pl.DataFrame | None = None  # a retriever's training_history
    nil_outcomes: pl.DataFrame | None = None


def _rows(dataset: str, method: str, values: dict[str, float]) -> list[dict]:
    return [{"dataset": dataset, "method": method, "split": "val", "metric": k, "value": float(v)}
            for k, v in values.items()]


def _of(metrics: pl.DataFrame, method: str) -> dict[str, float]:
    return dict(metrics.filter(pl.col("method") == method).select("metric", "value").iter_rows())


def _reranker_values(variant: VariantResult) -> dict[str, float]:
    """A reranker variant's row: its ranked list's metrics, its paired gain over the retriever's top-1 on
    the same mentions, and its cost (training seconds; ms per mention, from scoring every val mention)."""
    values, gain, stats = _of(variant.metrics, "kgmel + reranker"), _of(variant.metrics, "kgmel + rerank"), \
        variant.train_stats
    values.update(gain=gain["gain_vs_top1"], ci95=gain["gain_ci95"], train_s=float(stats["train_seconds"]),
                  ms_per_mention=1000 * stats["val_scoring_seconds"] / max(1, stats["val_mentions_scored"]))
    return values


def _retriever_values(variant: VariantResult) -> dict[str, float]:
    values, stats = _of(variant.metrics, variant.label), variant.train_stats
    values.update(train_s=float(stats["seconds"]), s_per_epoch=statistics.median(stats["epoch_seconds"]),
                  epochs=float(stats["epochs_run"]), best_epoch=float(stats["best_epoch"]))
    return values


def benchmark_table(dataset: str, variants: list[VariantResult]) -> tuple[pl.DataFrame, pl.DataFrame | None,
                                                                          pl.DataFrame | None]:
    """(BENCHMARK table, retriever training curves by variant, NIL precision-recall curves by variant)."""
    rows, history, nil_curves, zero_shot_done = [], [], [], set()
    for variant in variants:
        for method in ZERO_SHOT:
            shown = method
            if variant.label_only and method != "zero-shot names":
                shown += " (label-only entities)"
            if shown not in zero_shot_done:
                rows += _rows(dataset, shown, _of(variant.metrics, method))
                zero_shot_done.add(shown)
        out_of_kb = variant.metrics.filter(pl.col("method").str.ends_with("out-of-KB"))
        if out_of_kb.height:
            rows += _rows(dataset, f"{variant.label}, out-of-KB", dict(out_of_kb.select("metric", "value").iter_rows()))
        if variant.nil_outcomes is not None:
            nil_curves.append(precision_recall_curve(variant.nil_outcomes).with_columns(variant=pl.lit(variant.label)))
        if variant.is_reranker:
            rows += _rows(dataset, variant.label, _reranker_values(variant))
            continue
        rows += _rows(dataset, variant.label, _retriever_values(variant))
        history.append(variant.history.with_columns(variant=pl.lit(variant.label)))
    table = pl.DataFrame(rows, schema=pl.Schema(schemas.BENCHMARK))
    curves = pl.concat(history, how="diagonal_relaxed") if history else None
    return table, curves, pl.concat(nil_curves) if nil_curves else None
