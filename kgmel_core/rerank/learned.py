"""Stage 3 with the learned reranker: train it on the train split, fit its fusion with the retriever on
val, and rank each mention's candidates by the fused score."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from kgmel_core import schemas
from kgmel_core.config import CrossEncoderConfig
from kgmel_core.rerank.cross_encoder import CrossEncoder, RerankerTrainResult, RerankGroup, train_cross_encoder
from kgmel_core.rerank.fusion import Fusion, fit_fusion, fold_of, out_of_fold


def fused_hits1(
    groups: Sequence[RerankGroup], scores: Sequence[np.ndarray], fusion: Fusion | Sequence[Fusion]
) -> float:
    """HITS@1 in percent of the fused ranking over `groups` (a group without its gold is a miss)."""
    fusions = [fusion] * len(groups) if isinstance(fusion, Fusion) else list(fusion)
    hits = [g.gold is not None and int(np.argmax(f.apply(s, g.retrieval_scores))) == g.gold
            for g, s, f in zip(groups, scores, fusions, strict=True)]
    return 100.0 * float(np.mean(hits)) if hits else float("nan")


def fitted(groups: Sequence[RerankGroup], scores: Sequence[np.ndarray]) -> Fusion:
    return fit_fusion(scores, [g.retrieval_scores for g in groups], [g.gold for g in groups])


@dataclass
class TrainedReranker:
    result: RerankerTrainResult
    fusion: Fusion  # fitted on every val mention: what new mentions are ranked with
    val_fusions: dict[str, Fusion]  # each val mention's out-of-fold fusion: what its reported rank uses
    val_scores: dict[str, np.ndarray]  # the best model's scores of each val mention's candidates
    scoring_seconds: float  # of scoring every val mention once: the reranker's cost when serving

    def history_table(self) -> pl.DataFrame:
        return pl.DataFrame(self.result.history).drop("seconds")  # seconds vary by machine: the stats hold them

    def stats(self) -> dict:
        """What the train_reranker manifest records: the fusion new mentions get, and training's course."""
        result = self.result
        return {"fusion": {"reranker": self.fusion.reranker, "retrieval": self.fusion.retrieval},
                "best_step": result.best_step, "steps": result.steps, "best_val_sample_hits1": result.best_val_hits1,
                "train_seconds": round(result.seconds, 1), "train_groups": result.train_groups,
                "precision": result.precision, "val_scoring_seconds": round(self.scoring_seconds, 1),
                "val_mentions_scored": len(self.val_scores)}


def train_reranker(
    model: CrossEncoder,
    train: Sequence[RerankGroup],
    val: Sequence[RerankGroup],
    config: CrossEncoderConfig,
    checkpoint: Path,
) -> TrainedReranker:
    """Train on `train`, early-stopped on a seeded sample of `val` by the HITS@1 of the fused ranking;
    then score every val mention with the best model and fit the fusion (see `kgmel_core.rerank.fusion`)."""
    if not val:
        raise ValueError("no 'val' mention has candidates: the reranker is selected and fused on the validation split")
    sample = random.Random(config.seed).sample(list(val), min(config.val_mentions, len(val)))

    def quality(scores: list[np.ndarray]) -> float:
        return fused_hits1(sample, scores, fitted(sample, scores))

    result = train_cross_encoder(model, train, sample, config, quality, checkpoint)
    best = CrossEncoder(checkpoint, config.max_length, config.device, config.precision)
    started = time.perf_counter()
    scores = best.score(val, config.batch_pairs, progress=True)
    seconds = time.perf_counter() - started
    ids = [g.mention_id for g in val]
    folds = out_of_fold(ids, scores, [g.retrieval_scores for g in val], [g.gold for g in val])
    return TrainedReranker(result, fitted(val, scores), dict(zip(ids, folds, strict=True)),
                           dict(zip(ids, scores, strict=True)), seconds)


def ranked_table(groups: Sequence[RerankGroup], scores: Sequence[np.ndarray | None],
                 fusions: Sequence[Fusion]) -> pl.DataFrame:
    """RERANKED rows: each group's candidates ordered by fused score (ties keep retrieval order); a group
    without scores (not sent to the reranker) keeps the retrieval order, with no fused score."""
    rows = []
    for group, score, fusion in zip(groups, scores, fusions, strict=True):
        fused = fusion.apply(score, group.retrieval_scores) if score is not None else None
        order = sorted(range(len(group.qids)), key=lambda i: (-fused[i], i)) if fused is not None else range(
            len(group.qids))
        rows += [{"mention_id": group.mention_id, "rank": rank, "qid": group.qids[i],
                  "score": float(fused[i]) if fused is not None else None,
                  "reranker_score": float(score[i]) if score is not None else None,
                  "retrieval_score": float(group.retrieval_scores[i]), "retrieval_rank": i + 1}
                 for rank, i in enumerate(order, start=1)]
    return pl.DataFrame(rows, schema=pl.Schema(schemas.RERANKED))


def merged_scores(groups: Sequence[RerankGroup], sent: set[str], fresh: Mapping[str, np.ndarray],
                  known: Mapping[str, Mapping[str, float]]) -> list[np.ndarray | None]:
    """Each group's reranker scores: scored now (`fresh`), or kept from training (`known`: mention ->
    qid -> score); None for a mention the gate did not send."""
    out: list[np.ndarray | None] = []
    for group in groups:
        if group.mention_id not in sent:
            out.append(None)
        elif group.mention_id in fresh:
            out.append(fresh[group.mention_id])
        else:
            out.append(np.array([known[group.mention_id][q] for q in group.qids], np.float32))
    return out


def folds_table(fusions: Mapping[str, Fusion]) -> pl.DataFrame:
    rows = [{"mention_id": m, "fold": fold_of(m), "reranker_weight": f.reranker, "retrieval_weight": f.retrieval}
            for m, f in fusions.items()]
    return pl.DataFrame(rows, schema=pl.Schema(schemas.RERANKER_FOLDS))


def predictions_from_ranking(mention_ids: Sequence[str], in_scope_ids: set[str], sent: set[str],
                             ranked: pl.DataFrame, candidates: Mapping[str, list[str]],
                             margins: Mapping[str, float], failed: Mapping[str, str] | None = None,
                             source_name: str = "reranker") -> tuple[pl.DataFrame, dict[str, int]]:
    """One PREDICTIONS row per mention: the top of its reranked list, retrieval's top-1 when it was not
    sent (confident, or out of scope) or its reranking call failed (`failed`: mention -> call id), and
    how many ended each way."""
    failed = failed or {}
    top = dict(ranked.filter(pl.col("rank") == 1).select("mention_id", "qid").iter_rows())
    rows, outcomes = [], {}
    for mid in mention_ids:
        top1 = (candidates.get(mid) or [None])[0]
        if mid not in in_scope_ids:
            source, reason, qid = "fallback", "out_of_scope", top1
        elif mid not in sent:
            source, reason, qid = "retrieval", "confident", top1
        elif mid not in top:
            source, reason, qid = "fallback", "no_candidates", top1
        elif mid in failed:
            source, reason, qid = "fallback", "call_failed", top1
        else:
            source, reason, qid = source_name, None, top[mid]
        outcomes[reason or source] = outcomes.get(reason or source, 0) + 1
        rows.append({"mention_id": mid, "qid": qid, "source": source, "reason": reason, "call_id": failed.get(mid),
                     "margin": margins.get(mid), "answer": None})
    return pl.DataFrame(rows, schema=pl.Schema(schemas.PREDICTIONS)), outcomes


def scores_table(scores: Mapping[str, np.ndarray], groups: Sequence[RerankGroup]) -> pl.DataFrame:
    """The reranker's score of each (mention, candidate): kept with the trained model, so the rerank
    stage does not score its val mentions a second time."""
    by_id = {g.mention_id: g for g in groups}
    rows = [{"mention_id": m, "qid": q, "reranker_score": float(s)}
            for m, values in scores.items() for q, s in zip(by_id[m].qids, values, strict=True)]
    return pl.DataFrame(rows, schema=pl.Schema(schemas.RERANKER_SCORES))
