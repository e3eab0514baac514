"""Benchmark plots (matplotlib, PNG): training curves per variant and HITS@k curves per method.

Pure presentation: data in, a PNG file out; the benchmark stage decides where the file goes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window (and no display on servers)

import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402


def _two_panels() -> tuple[plt.Figure, tuple[plt.Axes, plt.Axes]]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax in axes:
        ax.set_prop_cycle(color=plt.get_cmap("tab10").colors)
    return fig, tuple(axes)


def _save(fig: plt.Figure, axes: tuple[plt.Axes, ...], path: Path, title: str) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(history: pl.DataFrame, path: Path, title: str) -> None:
    """`history`: variant, epoch, train_loss, val_hits1 -> two panels (loss, val HITS@1 per epoch)."""
    fig, (loss_ax, hits_ax) = _two_panels()
    for (variant,), rows in history.sort("epoch").group_by("variant", maintain_order=True):
        loss_ax.plot(rows["epoch"], rows["train_loss"], label=variant)
        validated = rows.filter(pl.col("val_hits1").is_not_nan())
        hits_ax.plot(validated["epoch"], validated["val_hits1"], marker=".", label=variant)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    hits_ax.set(xlabel="epoch", ylabel="val HITS@1 (%)", title="validation HITS@1 (whole KB)")
    hits_ax.legend(fontsize=7, loc="lower right")
    _save(fig, (loss_ax, hits_ax), path, title)


def hits_at_k(metrics: pl.DataFrame, path: Path, title: str) -> None:
    """`metrics`: method, k, hits -> one line per method over k."""
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for (method,), rows in metrics.sort("k").group_by("method", maintain_order=True):
        style = "--" if method.startswith("zero-shot") else "-"  # frozen baselines dashed
        ax.plot(rows["k"], rows["hits"], style, marker="o", label=method)
    ax.set(xlabel="k", ylabel="val HITS@k (%)", title=title, xscale="log")
    ks = sorted(set(metrics["k"].to_list()))
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def nil_precision_recall(curves: pl.DataFrame, path: Path, title: str) -> None:
    """`curves`: variant, nil_precision, nil_recall, in_kb_hits1 -> NIL precision against recall (left) and
    in-KB HITS@1 against NIL recall (right), one line per variant: the price of each threshold."""
    fig, (pr_ax, cost_ax) = _two_panels()
    for (variant,), rows in curves.sort("nil_recall").group_by("variant", maintain_order=True):
        pr_ax.plot(rows["nil_recall"], rows["nil_precision"], marker=".", label=variant)
        cost_ax.plot(rows["nil_recall"], rows["in_kb_hits1"], marker=".", label=variant)
    pr_ax.set(xlabel="NIL recall", ylabel="NIL precision", title="NIL precision-recall", xlim=(0, 1), ylim=(0, 1))
    cost_ax.set(xlabel="NIL recall", ylabel="in-KB HITS@1 (%)", title="what it costs in-KB mentions")
    cost_ax.legend(fontsize=7, loc="lower left")
    _save(fig, (pr_ax, cost_ax), path, title)
