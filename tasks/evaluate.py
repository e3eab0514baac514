"""Stage `evaluate`: HITS@k / MRR per split for the retriever, the zero-shot baselines and the reranker."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import torch
from prefect import task

from kgmel_core import schemas
from kgmel_core.data.texts import HeadTexts
from kgmel_core.llm.gate import gate_curve, knee
from kgmel_core.metrics import candidate_ranks, gold_ranks, metrics_markdown, paired_gain, ranking_metrics
from kgmel_core.retrieval.baselines import zero_shot_image, zero_shot_names, zero_shot_text, zero_shot_text_and_names
from kgmel_core.retrieval.features import Features, subset_side
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
    splits: list[str] | None = None,
) -> Artifact:
    """Headline numbers come from what was served: the retriever's HITS@k from the `candidates` the
    index returned (so an approximate index is scored as it really behaves; k beyond the served top-K
    is not reported), the reranker's from its `predictions`. Exact search over the fused vectors is a
    separately labelled diagnostic; the zero-shot baselines are exact searches of frozen embeddings.
    `splits`: evaluate only these (the benchmark asks for val alone); None: every split."""

    def build(writer):
        features = load_features(ingest, embed, None, HeadTexts.of(embed.manifest["config"]), max_triples=1)
        mentions = ingest.read("mentions")
        if evaluated_splits is not None:
            keep = [i for i, s in enumerate(features.mention_split) if s in evaluated_splits]
            rows_kept = torch.tensor(keep, dtype=torch.long)
            features = Features(
                features.banks, subset_side(features.mentions, rows_kept), features.entities,
                [features.mention_split[i] for i in keep], features.mention_gold_rows[rows_kept],
            )
            mentions = mentions[keep]
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
            split_of = dict(zip(features.mentions.ids, splits, strict=True))
            rerank_rows, curve = _rerank_rows(label, ingest, retrieve, rerank, split_of)
            rows += rerank_rows
            writer.write_table("rerank_gate_curve", curve, schemas.GATE_CURVE)
        table = pl.DataFrame(rows, schema=pl.Schema(schemas.METRICS))
        writer.write_table("metrics", table, schemas.METRICS)
        logger().info("metrics:\n%s", metrics_markdown(table))

    inputs = {"ingest": ingest, "embed": embed, "retrieve": retrieve, "rerank": rerank}
    evaluated_splits = sorted(splits) if splits else None
    return run_stage(ctx, "evaluate", {"label": label, "splits": evaluated_splits}, inputs, build)


def _rerank_rows(
    label: str, ingest: Artifact, retrieve: Artifact, rerank: Artifact, split_of: dict[str, str]
) -> tuple[list[dict], pl.DataFrame]:
    """The reranker against retrieval's top-1 on the same in-scope mentions (paired: the gain and its
    95% interval), the share sent to the LLM, fallbacks; and, when every in-scope mention was sent
    (no margin threshold), the adaptive-gate curve and the HITS@1 at its knee."""
    gold = ingest.read("mentions").select("mention_id", "gold_qid")
    top1 = retrieve.read("candidates").filter(pl.col("rank") == 1).select("mention_id", top1_qid="qid")
    frame = (
        rerank.read("predictions")
        .filter(pl.col("reason").is_null() | (pl.col("reason") != "out_of_scope"))
        .join(gold, on="mention_id")
        .join(top1, on="mention_id", how="left")
        .with_columns(
            split=pl.col("mention_id").replace_strict(split_of),
            llm_hit=(pl.col("qid") == pl.col("gold_qid")).fill_null(False),
            top1_hit=(pl.col("top1_qid") == pl.col("gold_qid")).fill_null(False),
        )
    )
    sent_all = rerank.manifest["config"].get("margin_threshold") is None
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
        if sent_all:
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


def _entity_vectors(ctx: PipelineContext, retrieve: Artifact, qids: list[str]) -> np.ndarray:
    index_artifact = ctx.store.input(retrieve, "index")
    fused = index_artifact.read("fused_entities")
    row = {q: i for i, q in enumerate(fused["qid"].to_list())}
    matrix = schemas.vector_matrix(fused["vector"])
    return matrix[[row[q] for q in qids]]
