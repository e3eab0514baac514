"""The retriever's candidate lists and triples grouped the way stage 3 reads them."""

from __future__ import annotations

import polars as pl


def candidate_lists(candidates: pl.DataFrame, k: int) -> dict[str, list[str]]:
    """mention_id -> its top-k candidate QIDs in retrieval order (from a `candidates` table)."""
    frame = candidates.filter(pl.col("rank") <= k).sort("mention_id", "rank")
    return {m: q for m, q in frame.group_by("mention_id", maintain_order=True).agg("qid").iter_rows()}


def relation_tail_pairs(frame: pl.DataFrame, *keys: str) -> dict:
    """(relation, tail) pairs of a triples table grouped by its key column(s), in table order."""
    grouped: dict = {}
    for row in frame.iter_rows(named=True):
        key = row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
        grouped.setdefault(key, []).append((row["relation"], row["tail"]))
    return grouped
