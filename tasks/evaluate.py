"""Stage `evaluate`: HITS@k / MRR per split for the retriever, the zero-shot baselines and the reranker."""

from __future__ import annotations

import numpy as np
import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.data.texts import HeadTexts
from kgmel_core.metrics import candidate_ranks, gold_ranks, metrics_markdown, ranking_metrics
from kgmel_core.retrieval.baselines import zero_shot_image, zero_shot_names, zero_shot_text, zero_shot_text_and_names
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.inputs import load_features


def _metric_rows(
    method: str, splits: list[str], ranks: np.ndarray, extra: dict[str, np.ndarray], depth: int | None = None
) -> list[dict]:
    rows = []
    split_array = np.array(splits)
    for split in sorted(set(splits)):
        mask = split_array == split
        values = ranking_metrics(ranks[mask], depth=depth)
        for name, array in extra.items():
            values[name] = float(array[mask].sum())
        rows += [{"method": method, "split": split, "metric": k, "value": float(v)} for k, v in values.items()]
    return rows


@task(name="evaluate", **STAGE_TASK)
def evaluate(
    ctx: PipelineContext,
    ingest: Artifact,
    embed: Artifact,
    retrieve: Artifact | None = None,
    rerank: Artifact | None = None,
    label: str = "kgmel",
) -> Artifact:
    """Headline numbers come from what was served: the retriever's HITS@k from the `candidates` the
    index returned (so an approximate index is scored as it really behaves; k beyond the served top-K
    is not reported), the reranker's from its `predictions`. Exact search over the fused vectors is a
    separately labelled diagnostic; the zero-shot baselines are exact searches of frozen embeddings."""

    def build(writer):
        features = load_features(ingest, embed, None, HeadTexts.of(embed.manifest["config"]), max_triples=1)
        splits = features.mention_split
        gold = features.mention_gold_rows
        missing = (gold < 0).numpy()
        rows: list[dict] = []
        for method, baseline in (
            ("zero-shot text", zero_shot_text),
            ("zero-shot names", zero_shot_names),
            ("zero-shot text + names", zero_shot_text_and_names),
        ):
            ranks, _ = gold_ranks(*baseline(features), gold.tolist())
            rows += _metric_rows(method, splits, ranks, {"gold_missing_from_kb": missing})
        if features.banks.image_dim is not None:
            ranks, _ = gold_ranks(*zero_shot_image(features), gold.tolist())
            no_image = (features.mentions.image < 0).numpy()
            rows += _metric_rows("zero-shot image", splits, ranks, {"mentions_without_image": no_image})
        if retrieve is not None:
            mentions = ingest.read("mentions")
            top_k = int(retrieve.manifest["stats"]["top_k"])
            ranks = candidate_ranks(retrieve.read("candidates"), mentions["mention_id"], mentions["gold_qid"])
            rows += _metric_rows(label, splits, ranks, {"gold_missing_from_kb": missing}, depth=top_k)
            fused = retrieve.read("fused_mentions")
            order = {mid: i for i, mid in enumerate(fused["mention_id"].to_list())}
            aligned = schemas.vector_matrix(fused["vector"])[[order[mid] for mid in features.mentions.ids]]
            exact, ties = gold_ranks(aligned, _entity_vectors(ctx, retrieve, features.entities.ids), gold.tolist())
            rows += _metric_rows(f"{label} (exact search, diagnostic)", splits, exact, {})
            writer.stats.update(retriever_ties=ties, served_top_k=top_k)
        if rerank is not None:
            rows += _rerank_rows(label, ingest, retrieve, rerank, dict(zip(features.mentions.ids, splits, strict=True)))
        table = pl.DataFrame(rows, schema=pl.Schema(schemas.METRICS))
        writer.write_table("metrics", table, schemas.METRICS)
        logger().info("metrics:\n%s", metrics_markdown(table))

    inputs = {"ingest": ingest, "embed": embed, "retrieve": retrieve, "rerank": rerank}
    return run_stage(ctx, "evaluate", {"label": label}, inputs, build)


def _rerank_rows(
    label: str, ingest: Artifact, retrieve: Artifact | None, rerank: Artifact, split_of: dict[str, str]
) -> list[dict]:
    """HITS@1 after reranking over all mentions, and, on the mentions the LLM was asked about, the
    retriever's top-1 beside the reranked answer (the fair comparison when only a subset is reranked)."""
    gold = ingest.read("mentions").select("mention_id", "gold_qid")
    frame = (
        rerank.read("predictions")
        .join(gold, on="mention_id")
        .with_columns(split=pl.col("mention_id").replace_strict(split_of), hit=pl.col("qid") == pl.col("gold_qid"))
    )
    if retrieve is not None:
        top1 = retrieve.read("candidates").filter(pl.col("rank") == 1).select("mention_id", top1_qid="qid")
        frame = frame.join(top1, on="mention_id", how="left").with_columns(
            top1_hit=pl.col("top1_qid") == pl.col("gold_qid")
        )
    rows = []

    def add(method: str, subset: pl.DataFrame, column: str) -> None:
        for split, group in subset.group_by("split"):
            if column == "top1_hit":  # the retriever's answer: no LLM, no fallback to count
                group = group.with_columns(source=pl.lit("retrieval"))
            rows.extend(
                [
                    {
                        "method": method,
                        "split": split[0],
                        "metric": "hits@1",
                        "value": 100 * group[column].fill_null(False).mean(),
                    },
                    {"method": method, "split": split[0], "metric": "n", "value": float(group.height)},
                    {
                        "method": method,
                        "split": split[0],
                        "metric": "fallbacks",
                        "value": float((group["source"] == "fallback").sum()),
                    },
                ]
            )

    add(f"{label} + rerank (all mentions)", frame, "hit")
    asked = frame.filter(pl.col("reason").is_null() | ~pl.col("reason").is_in(["out_of_scope", "no_candidates"]))
    add(f"{label} + rerank (reranked mentions)", asked, "hit")
    if retrieve is not None:
        add(f"{label} top-1 (reranked mentions)", asked, "top1_hit")
    return rows


def _entity_vectors(ctx: PipelineContext, retrieve: Artifact, qids: list[str]) -> np.ndarray:
    index_artifact = ctx.store.input(retrieve, "index")
    fused = index_artifact.read("fused_entities")
    row = {q: i for i, q in enumerate(fused["qid"].to_list())}
    matrix = schemas.vector_matrix(fused["vector"])
    return matrix[[row[q] for q in qids]]
