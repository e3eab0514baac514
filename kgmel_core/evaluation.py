"""The evaluate stage's numbers: HITS@k / MRR per split for the zero-shot baselines, the served
retriever and stage 3, from tables alone.

Headline numbers come from what was served: the retriever's HITS@k from the `candidates` the index
returned (so an approximate index is scored as it really behaves; k beyond the served top-K is not
reported), stage 3's from its `predictions`. Exact search over the fused vectors is a separately
labelled diagnostic; the zero-shot baselines are exact searches of frozen embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from kgmel_core import schemas
from kgmel_core.metrics import candidate_ranks, gold_ranks, paired_gain, ranking_metrics
from kgmel_core.nil import out_of_kb_evaluation, val_lists
from kgmel_core.rerank.gate import gate_curve, knee
from kgmel_core.retrieval.baselines import zero_shot_image, zero_shot_names, zero_shot_text, zero_shot_text_and_names
from kgmel_core.retrieval.features import Features, subset_side

BASELINES = (
    ("zero-shot text", zero_shot_text),
    ("zero-shot names", zero_shot_names),
    ("zero-shot text + names", zero_shot_text_and_names),
)


@dataclass
class Served:
    """What the retrieve stage served: its candidate lists (depth `top_k`), the fused mention vectors
    and the indexed entity vectors (`fused_entities`), for the exact-search diagnostic."""

    candidates: pl.DataFrame
    top_k: int
    fused_mentions: pl.DataFrame
    fused_entities: pl.DataFrame


@dataclass
class Reranked:
    """Stage 3's `predictions`, whether every in-scope mention was sent (no margin threshold), which
    is when the adaptive-gate curve can be drawn, and the learned reranker's ranked lists (`reranked`)."""

    predictions: pl.DataFrame
    sent_all: bool
    ranked: pl.DataFrame | None = None


@dataclass
class OutOfKB:
    """What the out-of-KB evaluation (`kgmel_core.nil`) reads beyond the ranked lists: the KB's labels and
    the entities that are gold in train (never withheld)."""

    entities: pl.DataFrame
    train_gold: set[str]
    share: float
    seed: int
    max_cost: float | None = None  # the threshold's bound on lost in-KB HITS@1 points (`kgmel_core.nil`)


@dataclass
class Evaluation:
    metrics: pl.DataFrame  # METRICS
    gate_curve: pl.DataFrame | None = None  # GATE_CURVE, when stage 3 was evaluated
    nil_outcomes: pl.DataFrame | None = None  # NIL_OUTCOMES, when the out-of-KB evaluation ran
    stats: dict = field(default_factory=dict)


def metric_rows(
    method: str, splits: Sequence[str], ranks: np.ndarray, extra: dict[str, np.ndarray], depth: int | None = None
) -> list[dict]:
    """METRICS rows of one method: ranking metrics per split, plus counts (`extra`: name -> 0/1 per mention)."""
    rows = []
    split_array = np.array(splits)
    for split in sorted(set(splits)):
        mask = split_array == split
        values = ranking_metrics(ranks[mask], depth=depth)
        for name, array in extra.items():
            values[name] = float(array[mask].sum())
        rows += [{"method": method, "split": split, "metric": k, "value": float(v)} for k, v in values.items()]
    return rows


def restrict_to_splits(
    features: Features, mentions: pl.DataFrame, splits: Sequence[str]
) -> tuple[Features, pl.DataFrame]:
    """The mentions of `splits` only (features and the mentions table, row-aligned)."""
    keep = [i for i, s in enumerate(features.mention_split) if s in splits]
    rows = torch.tensor(keep, dtype=torch.long)
    restricted = Features(
        features.banks, subset_side(features.mentions, rows), features.entities,
        [features.mention_split[i] for i in keep], features.mention_gold_rows[rows],
    )
    return restricted, mentions[keep]


def aligned_vectors(table: pl.DataFrame, id_column: str, ids: Sequence[str]) -> np.ndarray:
    """The `vector` column of `table` in the order of `ids`."""
    row = {key: i for i, key in enumerate(table[id_column].to_list())}
    return schemas.vector_matrix(table["vector"])[[row[key] for key in ids]]


def evaluate_tables(
    features: Features, mentions: pl.DataFrame, label: str, served: Served | None, reranked: Reranked | None,
    out_of_kb: OutOfKB | None = None,
) -> Evaluation:
    """Every metric row for `mentions` (row-aligned with `features`); with `out_of_kb`, also the out-of-KB
    evaluation of the final ranked list (the reranker's, else the retriever's) on the val mentions."""
    splits = features.mention_split
    gold = features.mention_gold_rows
    missing = (gold < 0).numpy()
    rows: list[dict] = []
    result = Evaluation(pl.DataFrame())
    for method, baseline in BASELINES:
        ranks, _ = gold_ranks(*baseline(features), gold.tolist())
        rows += metric_rows(method, splits, ranks, {"gold_missing_from_kb": missing})
    if features.banks.image_dim is not None:
        ranks, _ = gold_ranks(*zero_shot_image(features), gold.tolist())
        no_image = (features.mentions.image < 0).numpy()
        rows += metric_rows("zero-shot image", splits, ranks, {"mentions_without_image": no_image})
    if served is not None:
        ranks = candidate_ranks(served.candidates, mentions["mention_id"], mentions["gold_qid"])
        rows += metric_rows(label, splits, ranks, {"gold_missing_from_kb": missing}, depth=served.top_k)
        exact, ties = gold_ranks(
            aligned_vectors(served.fused_mentions, "mention_id", features.mentions.ids),
            aligned_vectors(served.fused_entities, "qid", features.entities.ids),
            gold.tolist(),
        )
        rows += metric_rows(f"{label} (exact search, diagnostic)", splits, exact, {})
        result.stats.update(retriever_ties=ties, served_top_k=served.top_k)
    if reranked is not None and reranked.ranked is not None:  # the reranked list, over the mentions it holds
        listed = set(reranked.ranked["mention_id"].to_list())
        keep = [i for i, m in enumerate(features.mentions.ids) if m in listed]
        ranks = candidate_ranks(reranked.ranked, mentions["mention_id"][keep], mentions["gold_qid"][keep])
        depth = int(reranked.ranked["rank"].max() or 0)
        rows += metric_rows(f"{label} + reranker", [splits[i] for i in keep], ranks, {}, depth=depth)
    if reranked is not None:
        split_of = dict(zip(features.mentions.ids, splits, strict=True))
        rerank_rows, result.gate_curve = _rerank_rows(label, mentions, served.candidates, reranked, split_of)
        rows += rerank_rows
    if out_of_kb is not None and served is not None:
        rows += out_of_kb_rows(label, mentions, served, reranked, out_of_kb, result)
    result.metrics = pl.DataFrame(rows, schema=pl.Schema(schemas.METRICS))
    return result


def out_of_kb_rows(label: str, mentions: pl.DataFrame, served: Served, reranked: Reranked | None,
                   out_of_kb: OutOfKB, result: Evaluation) -> list[dict]:
    """METRICS rows of the out-of-KB evaluation of the final list on the val `mentions`; its per-mention
    outcomes go to `result.nil_outcomes`. Too few val mentions to make NIL ones: no rows, the reason in
    `result.stats["out_of_kb_skipped"]` (the run summary says so)."""
    val = mentions.filter(pl.col("split") == "val")
    has_list = reranked is not None and reranked.ranked is not None
    final = reranked.ranked if has_list else served.candidates
    method = f"{label} + reranker, out-of-KB" if has_list else f"{label}, out-of-KB"
    lists = val_lists(final, val, out_of_kb.entities)
    try:
        metrics, result.nil_outcomes = out_of_kb_evaluation(lists, val, out_of_kb.train_gold, out_of_kb.share,
                                                            out_of_kb.seed, out_of_kb.max_cost)
    except ValueError as exc:  # too few val mentions (or none never gold in train) to make NIL ones
        result.stats["out_of_kb_skipped"] = str(exc)
        return []
    return [{"method": method, "split": "val", "metric": k, "value": float(v)} for k, v in metrics.items()]


def _rerank_rows(
    label: str, mentions: pl.DataFrame, candidates: pl.DataFrame, reranked: Reranked, split_of: dict[str, str]
) -> tuple[list[dict], pl.DataFrame]:
    """The reranker against retrieval's top-1 on the same in-scope mentions (paired: the gain and its
    95% interval), the share sent to the LLM, fallbacks; and, when every in-scope mention was sent
    (no margin threshold), the adaptive-gate curve and the HITS@1 at its knee."""
    gold = mentions.select("mention_id", "gold_qid")
    top1 = candidates.filter(pl.col("rank") == 1).select("mention_id", top1_qid="qid")
    frame = (
        reranked.predictions
        .filter(pl.col("reason").is_null() | (pl.col("reason") != "out_of_scope"))
        .join(gold, on="mention_id")
        .join(top1, on="mention_id", how="left")
        .with_columns(
            split=pl.col("mention_id").replace_strict(split_of),
            llm_hit=(pl.col("qid") == pl.col("gold_qid")).fill_null(False),
            top1_hit=(pl.col("top1_qid") == pl.col("gold_qid")).fill_null(False),
        )
    )
    rows, curves = [], []
    for (split,), group in frame.group_by("split", maintain_order=True):
        n = group.height
        gain, half_width = paired_gain(group["llm_hit"].to_numpy(), group["top1_hit"].to_numpy())
        values = {
            f"{label} + rerank": {
                "hits@1": 100 * group["llm_hit"].mean(),
                "n": n,
                "sent_to_llm": (group["source"] != "retrieval").sum() / n,
                "fallbacks": (group["source"] == "fallback").sum(),
                "gain_vs_top1": gain,
                "gain_ci95": half_width,
            },
            f"{label} top-1 (same mentions)": {"hits@1": 100 * group["top1_hit"].mean(), "n": n},
        }
        if reranked.sent_all:
            curve = gate_curve(group.select("mention_id", pl.col("margin").fill_null(math.inf), "llm_hit", "top1_hit"))
            threshold = knee(curve)
            at_knee = curve.filter(pl.col("threshold") == threshold).row(0, named=True)
            values[f"{label} + adaptive rerank (knee)"] = {
                "hits@1": at_knee["hits1"], "n": n, "sent_to_llm": at_knee["sent"], "margin_threshold": threshold,
            }
            curves.append(curve.with_columns(split=pl.lit(split)))
        for method, metrics in values.items():
            rows += [{"method": method, "split": split, "metric": k, "value": float(v)} for k, v in metrics.items()]
    empty = pl.DataFrame(schema=pl.Schema(schemas.GATE_CURVE))
    return rows, pl.concat(curves).select(schemas.GATE_CURVE.names) if curves else empty
