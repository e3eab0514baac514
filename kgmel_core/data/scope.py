"""Which mentions an expensive stage (an LLM or reranker call per mention) runs on."""

from __future__ import annotations

import polars as pl

from kgmel_core.config import LLMScope


def in_scope(mentions: pl.DataFrame, scope: LLMScope) -> pl.DataFrame:
    """The mentions of the chosen splits; `max_mentions` of them, the first by id or a seeded sample."""
    chosen = mentions if scope.splits is None else mentions.filter(pl.col("split").is_in(scope.splits))
    chosen = chosen.sort("mention_id")
    if not scope.max_mentions or chosen.height <= scope.max_mentions:
        return chosen
    if scope.sample_seed is None:
        return chosen.head(scope.max_mentions)
    return chosen.sample(scope.max_mentions, seed=scope.sample_seed).sort("mention_id")
