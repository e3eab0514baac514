"""Which mentions an expensive stage (an LLM or reranker call per mention) runs on."""

from __future__ import annotations

import polars as pl

from kgmel_core.config import LLMScope


def in_scope(mentions: pl.DataFrame, scope: LLMScope) -> pl.DataFrame:
    """The mentions of the chosen splits; `max_mentions` of them (or `per_split` of each), the first by id or
    a seeded sample."""
    if scope.per_split is not None:
        parts = [
            _first_or_sample(mentions.filter(pl.col("split") == split), n, scope.sample_seed)
            for split, n in scope.per_split.items()
        ]
        return pl.concat(parts).sort("mention_id")
    chosen = mentions if scope.splits is None else mentions.filter(pl.col("split").is_in(scope.splits))
    return _first_or_sample(chosen, scope.max_mentions, scope.sample_seed)


def _first_or_sample(mentions: pl.DataFrame, n: int | None, seed: int | None) -> pl.DataFrame:
    chosen = mentions.sort("mention_id")
    if not n or chosen.height <= n:
        return chosen
    if seed is None:
        return chosen.head(n)
    return chosen.sample(n, seed=seed).sort("mention_id")
