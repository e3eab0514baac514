"""Adaptive reranking: spend the LLM only where retrieval is unsure.

The paper calls the LLM for every mention; a linker serving millions of mentions cannot. Retrieval
knows when it is unsure: the gap between its two best scores (the margin). A mention goes to the LLM
only when its margin is below a threshold; the others keep retrieval's top-1 (counted as confident,
not as fallbacks). Threshold 0 sends none, no threshold (None) sends all.

The threshold is chosen on validation from the curve "HITS@1 against the fraction of mentions sent",
computed offline from one run that asked the LLM about every mention.
"""

from __future__ import annotations

import math

import polars as pl


def retrieval_margins(candidates: pl.DataFrame) -> pl.DataFrame:
    """mention_id, margin = score of rank 1 - score of rank 2 (inf when there is a single candidate)."""
    top = candidates.filter(pl.col("rank") <= 2).sort("mention_id", "rank")
    margins = top.group_by("mention_id", maintain_order=True).agg(
        margin=pl.col("score").first().cast(pl.Float64) - pl.col("score").slice(1, 1).first().cast(pl.Float64)
    )
    return margins.with_columns(pl.col("margin").fill_null(math.inf))


def is_sent(margin: float, threshold: float | None) -> bool:
    """None or inf: every mention (also one with a single candidate, whose margin is inf)."""
    return threshold is None or math.isinf(threshold) or margin < threshold


def gate_curve(outcomes: pl.DataFrame) -> pl.DataFrame:
    """HITS@1 if only mentions with margin below each threshold were sent to the LLM.

    `outcomes`: mention_id, margin, llm_hit (the LLM's answer, or its fallback, is gold), top1_hit.
    Returns threshold, sent (fraction), hits1 (percent): one row per distinct cut, from none to all.
    """
    frame = outcomes.sort("margin")
    n = frame.height
    if n == 0:
        return pl.DataFrame(schema={"threshold": pl.Float64, "sent": pl.Float64, "hits1": pl.Float64})
    llm, top1 = frame["llm_hit"].cast(pl.Int64).to_list(), frame["top1_hit"].cast(pl.Int64).to_list()
    margins = frame["margin"].to_list()
    rows, correct = [], sum(top1)
    rows.append((0.0, 0.0, 100.0 * correct / n))
    for i in range(n):  # sending the i+1 least confident mentions
        correct += llm[i] - top1[i]
        if i + 1 < n and margins[i + 1] == margins[i]:
            continue  # a threshold cannot split equal margins
        threshold = margins[i + 1] if i + 1 < n else math.inf
        rows.append((float(threshold), (i + 1) / n, 100.0 * correct / n))
    return pl.DataFrame(rows, schema={"threshold": pl.Float64, "sent": pl.Float64, "hits1": pl.Float64}, orient="row")


def knee(curve: pl.DataFrame, share_of_gain: float = 0.95) -> float:
    """The threshold that sends the fewest mentions while keeping `share_of_gain` of the best gain
    over retrieval alone; 0 (send none) when the LLM gains nothing at any threshold."""
    base = curve["hits1"][0]
    gain = curve["hits1"].max() - base
    if gain <= 0:
        return 0.0
    good = curve.filter(pl.col("hits1") - base >= share_of_gain * gain).sort("sent")
    return float(good["threshold"][0])
