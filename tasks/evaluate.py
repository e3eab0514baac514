"""Stage `evaluate`: HITS@k / MRR per split for the retriever, the zero-shot baselines and the reranker."""

from __future__ import annotations

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from kgmel_core import schemas
from kgmel_core.baselines import zero_shot_image, zero_shot_text
from kgmel_core.config import EncoderConfig
from kgmel_core.metrics import gold_ranks, ranking_metrics
from storage import Artifact
from tasks.common import PipelineContext, logger, run_stage
from tasks.retrieval import load_features

VERSION = "1"


def _metric_rows(method: str, splits: list[str], ranks: np.ndarray, extra: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    split_array = np.array(splits)
    for split in sorted(set(splits)):
        mask = split_array == split
        values = ranking_metrics(ranks[mask])
        for name, array in extra.items():
            values[name] = float(array[mask].sum())
        rows += [{"method": method, "split": split, "metric": k, "value": float(v)} for k, v in values.items()]
    return rows


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    ctx: PipelineContext,
    encoder: EncoderConfig,
    ingest: Artifact,
    embed: Artifact,
    retrieve: Artifact | None = None,
    rerank: Artifact | None = None,
    label: str = "kgmel",
) -> Artifact:
    inputs = {"ingest": ingest.key, "embed": embed.key}
    if retrieve is not None:
        inputs["retrieve"] = retrieve.key
    if rerank is not None:
        inputs["rerank"] = rerank.key

    def build(writer):
        features = load_features(ingest, embed, None, encoder, max_triples=1)
        splits = features.mention_split
        gold = features.mention_gold_rows
        missing = (gold < 0).numpy()
        rows: list[dict] = []
        for method, (m, e) in {"zero-shot text": zero_shot_text(features)}.items():
            ranks, _ = gold_ranks(m, e, gold.tolist())
            rows += _metric_rows(method, splits, ranks, {"gold_missing_from_kb": missing})
        if features.banks.image_dim is not None:
            ranks, _ = gold_ranks(*zero_shot_image(features), gold.tolist())
            no_image = (features.mentions.image < 0).numpy()
            rows += _metric_rows("zero-shot image", splits, ranks, {"mentions_without_image": no_image})
        if retrieve is not None:
            mentions = retrieve.read("fused_mentions")
            index_vectors = _entity_vectors(ctx, retrieve, features.entities.ids)
            order = {mid: i for i, mid in enumerate(mentions["mention_id"].to_list())}
            aligned = np.stack([mentions["vector"][order[mid]].to_numpy() for mid in features.mentions.ids])
            ranks, ties = gold_ranks(aligned, index_vectors, gold.tolist())
            rows += _metric_rows(label, splits, ranks, {"gold_missing_from_kb": missing})
            writer.stats["retriever_ties"] = ties
        if rerank is not None:
            predictions = rerank.read("predictions")
            gold_qid = dict(
                zip(ingest.read("mentions")["mention_id"], ingest.read("mentions")["gold_qid"], strict=True)
            )
            split_of = dict(zip(features.mentions.ids, splits, strict=True))
            hits = (
                pl.DataFrame(
                    {
                        "split": [split_of[m] for m in predictions["mention_id"]],
                        "hit": [
                            p == gold_qid[m] for m, p in zip(predictions["mention_id"], predictions["qid"], strict=True)
                        ],
                        "fallback": (predictions["source"] == "fallback").to_list(),
                    }
                )
                .group_by("split")
                .agg(pl.col("hit").mean() * 100, pl.col("fallback").sum(), pl.len())
            )
            for row in hits.iter_rows(named=True):
                rows += [
                    {"method": f"{label} + rerank", "split": row["split"], "metric": "hits@1", "value": row["hit"]},
                    {
                        "method": f"{label} + rerank",
                        "split": row["split"],
                        "metric": "fallbacks",
                        "value": float(row["fallback"]),
                    },
                    {"method": f"{label} + rerank", "split": row["split"], "metric": "n", "value": float(row["len"])},
                ]
        table = pl.DataFrame(rows, schema=pl.Schema(schemas.METRICS))
        writer.write_table("metrics", table, schemas.METRICS)
        logger().info("metrics:\n%s", format_metrics(table))

    return run_stage(ctx, "evaluate", VERSION, {"label": label, "mention_text": encoder.mention_text}, inputs, build)


def _entity_vectors(ctx: PipelineContext, retrieve: Artifact, qids: list[str]) -> np.ndarray:
    index_artifact = ctx.store.require("index", retrieve.manifest["inputs"]["index"])
    fused = index_artifact.read("fused_entities")
    row = {q: i for i, q in enumerate(fused["qid"].to_list())}
    matrix = np.asarray(fused["vector"].to_numpy(), dtype=np.float32).reshape(fused.height, -1)
    return matrix[[row[q] for q in qids]]


def format_metrics(
    metrics: pl.DataFrame, metrics_shown: tuple[str, ...] = ("hits@1", "hits@5", "hits@16", "mrr", "n")
) -> str:
    """One row per (method, split), one column per metric."""
    wide = (
        metrics.filter(pl.col("metric").is_in(metrics_shown))
        .pivot(on="metric", index=["method", "split"], values="value")
        .sort("split", "method")
    )
    return str(wide)
