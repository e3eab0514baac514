"""Ranking metrics over the whole KB: HITS@k and MRR, with ties and missing gold counted.

Ranks are pessimistic: an entity scoring exactly as high as the gold entity is ranked ahead of it,
so a model that gives every entity the same score gets no credit. Mentions whose gold entity is
not in the KB count as misses (rank = infinity) and are reported, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import torch

HITS_AT = (1, 3, 5, 10, 16)


def gold_ranks(
    mention_vectors: np.ndarray | torch.Tensor,
    entity_vectors: np.ndarray | torch.Tensor,
    gold_rows: Sequence[int],
    chunk: int = 1024,
) -> tuple[np.ndarray, int]:
    """1-based rank of each mention's gold entity by inner product; gold_rows[i] = -1: not in KB.

    Returns (ranks as float with inf for missing gold, number of mentions whose gold score was tied).
    """
    m = torch.as_tensor(mention_vectors, dtype=torch.float32)
    e = torch.as_tensor(entity_vectors, dtype=torch.float32)
    gold = torch.as_tensor(np.asarray(gold_rows, dtype=np.int64))
    ranks = np.full(len(gold), np.inf)
    ties = 0
    for start in range(0, len(gold), chunk):
        g = gold[start : start + chunk]
        scores = m[start : start + chunk] @ e.T
        present = g >= 0
        gold_scores = scores.gather(1, g.clamp_min(0).unsqueeze(1))
        higher = (scores > gold_scores).sum(1)
        equal = (scores == gold_scores).sum(1) - 1
        rank = (higher + equal + 1).double().numpy()
        ranks[start : start + chunk] = np.where(present.numpy(), rank, np.inf)
        ties += int(((equal > 0) & present).sum())
    return ranks, ties


def ranking_metrics(
    ranks: np.ndarray, hits_at: Sequence[int] = HITS_AT, depth: int | None = None
) -> dict[str, float]:
    """HITS@k in percent and MRR (0..1) over all mentions, missing gold included as misses.

    `depth`: ranks come from a served top-`depth` list (gold beyond it is a miss), so HITS@k for
    k > depth cannot be known and is NaN, and MRR is MRR@depth.
    """
    n = len(ranks)
    if n == 0:
        return {**{f"hits@{k}": float("nan") for k in hits_at}, "mrr": float("nan"), "n": 0}
    out = {
        f"hits@{k}": float("nan") if depth is not None and k > depth else float(100.0 * np.mean(ranks <= k))
        for k in hits_at
    }
    out["mrr"] = float(np.mean(1.0 / ranks))
    out["n"] = n
    return out


def candidate_ranks(
    candidates: pl.DataFrame, mention_ids: Sequence[str], gold_qids: Sequence[str | None]
) -> np.ndarray:
    """1-based rank of each mention's gold entity in its served candidate list (`mention_id`, `rank`,
    `qid`), aligned with `mention_ids`; inf when gold is not among the candidates (or unknown)."""
    gold = pl.DataFrame(
        {"mention_id": list(mention_ids), "qid": list(gold_qids)}, schema={"mention_id": pl.String, "qid": pl.String}
    )
    served = candidates.select("mention_id", "qid", pl.col("rank").cast(pl.Float64))
    found = gold.with_row_index("position").join(served, on=["mention_id", "qid"], how="left").sort("position")
    return found["rank"].fill_null(np.inf).to_numpy()


def paired_gain(a_hits: np.ndarray, b_hits: np.ndarray) -> tuple[float, float]:
    """Gain of a over b in HITS@1 points on the same mentions, and the half-width of its 95% interval
    (normal approximation of the paired differences; 0 with fewer than two mentions)."""
    diff = a_hits.astype(np.float64) - b_hits.astype(np.float64)
    if len(diff) < 2:
        return float(100 * diff.mean()) if len(diff) else float("nan"), 0.0
    return float(100 * diff.mean()), float(100 * 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)))


METRICS_SHOWN = ("hits@1", "hits@3", "hits@5", "hits@10", "hits@16", "mrr")
RERANK_SHOWN = ("n", "hits@1", "sent_to_llm", "fallbacks", "gain_vs_top1", "gain_ci95", "margin_threshold")
NIL_SHOWN = ("n", "nil_mentions", "nil_precision", "nil_recall", "nil_f1", "in_kb_hits@1", "in_kb_hits@1_with_nil",
             "accuracy_with_nil", "nil_threshold")
NIL_SHORT = {"nil_mentions": "nil", "nil_precision": "nil P", "nil_recall": "nil R", "nil_f1": "nil F1",
             "in_kb_hits@1": "in-KB hits@1", "in_kb_hits@1_with_nil": "with NIL", "accuracy_with_nil": "accuracy",
             "nil_threshold": "threshold"}


SPLIT_ORDER = ("val", "test", "train")  # quality is reported on val, so its rows come first
COUNT_METRICS = ("n", "nil_mentions")


def wide_metrics(metrics: pl.DataFrame, shown: Sequence[str] = METRICS_SHOWN) -> pl.DataFrame:
    """A `metrics` table (method, split, metric, value) as one row per (method, split), rounded; val
    rows first, then test and train (any other split after them), counts as integers."""
    wide = (
        metrics.filter(pl.col("metric").is_in(list(shown)))
        .with_columns(pl.col("value").round(2))
        .pivot(on="metric", index=["method", "split"], values="value")
    )
    split_rank = pl.col("split").replace_strict(SPLIT_ORDER, range(len(SPLIT_ORDER)), default=len(SPLIT_ORDER))
    wide = wide.sort(split_rank, "split", "method").with_columns(
        pl.col(m).cast(pl.Int64) for m in COUNT_METRICS if m in wide.columns
    )
    return wide.select(["method", "split", *[m for m in shown if m in wide.columns]])


def metric_tables(metrics: pl.DataFrame, shown: Sequence[str] = METRICS_SHOWN) -> list[tuple[str, pl.DataFrame]]:
    """Retrieval rows, LLM-rerank rows and out-of-KB rows as separate tables: their columns differ, and one
    table with all of them is too wide to read in a terminal."""
    is_out_of_kb = pl.col("method").str.ends_with("out-of-KB")
    is_rerank = pl.col("method").str.contains(r"rerank\b|same mentions")  # not "+ reranker": a ranked list
    tables = [("retrieval", wide_metrics(metrics.filter(~is_rerank & ~is_out_of_kb), shown))]
    if metrics.filter(is_rerank).height:
        short = {"sent_to_llm": "sent", "gain_vs_top1": "gain", "gain_ci95": "ci95 ±", "margin_threshold": "threshold"}
        rerank = wide_metrics(metrics.filter(is_rerank), RERANK_SHOWN)
        tables.append(("LLM rerank vs. retrieval top-1 on the same mentions", rerank.rename(short, strict=False)))
    if metrics.filter(is_out_of_kb).height:
        nil = wide_metrics(metrics.filter(is_out_of_kb), NIL_SHOWN).rename(NIL_SHORT, strict=False)
        tables.append(("out-of-KB (val mentions made NIL by withholding their gold entity; NIL P/R/F1, "
                       "in-KB HITS@1 without and with the NIL decision)", nil))
    return tables


def metrics_markdown(metrics: pl.DataFrame, shown: Sequence[str] = METRICS_SHOWN) -> str:
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        tbl_rows=-1,
        tbl_cols=-1,
        fmt_str_lengths=80,
        tbl_width_chars=250,
    ):
        return "\n\n".join(f"{title}:\n\n{table}" for title, table in metric_tables(metrics, shown))
