"""Say "not in the KB": a calibrated probability that a mention's entity is absent, from its final ranked
list, and the out-of-KB evaluation that makes such mentions by withholding gold entities.

The benchmarks hold no NIL mentions, so the evaluation makes them the standard way: a seeded share of
val mentions lose their gold entity from the lists that answer them. Only entities that are gold for no
train mention are withheld, so the trained models are unchanged; every val mention of a withheld entity
becomes NIL. Removing an entity from a list of exact-search (or fused) scores is what searching an index
without it returns, except that the list is one candidate shorter.

The decision is a logistic regression on the final list's top-1 (its score, the reranker's own score and the
retriever's cosine where the list carries them, the word overlap of mention and label) and the margin to the
runner-up, fitted on val; its threshold maximises NIL F1 there among the cuts that cost at most `max_cost`
HITS@1 points on the in-KB mentions (a user trades NIL recall for answers they keep, not the reverse). Each val
mention's reported outcome comes from the model fitted on the other fold (`fold_of`), like the reranker's
fusion, so what is reported was not fitted on the mention itself. The model a version serves
(`fit_served_model`) is fitted on every val mention; `nil_decisions` applies it to new mentions' lists.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from kgmel_core.rerank.fusion import fold_of

# Per-candidate columns a ranked list may carry; each one's top-1 value is a feature.
SCORE_COLUMNS = ("score", "reranker_score", "retrieval_score", "name_match")


def _tokens(text: str) -> set[str]:
    return set(text.lower().split())


def with_name_match(ranked: pl.DataFrame, mentions: pl.DataFrame, entities: pl.DataFrame) -> pl.DataFrame:
    """`name_match`: the word overlap (Jaccard) of the mention's surface and the candidate's label. A withheld
    entity's namesake often keeps the name; an unrelated top-1 rarely has it."""
    surface = dict(mentions.select("mention_id", "mention").iter_rows())
    label = dict(entities.select("qid", "label").iter_rows())
    values = []
    for mention_id, qid in ranked.select("mention_id", "qid").iter_rows():
        a, b = _tokens(surface.get(mention_id, "")), _tokens(label.get(qid) or "")
        values.append(len(a & b) / len(a | b) if a | b else 0.0)
    return ranked.with_columns(name_match=pl.Series(values, dtype=pl.Float64))


def val_lists(final: pl.DataFrame, val: pl.DataFrame, entities: pl.DataFrame) -> pl.DataFrame:
    """The final ranked lists of the `val` mentions, with the `name_match` feature the NIL model reads."""
    return with_name_match(final.filter(pl.col("mention_id").is_in(val["mention_id"].implode())), val, entities)


def train_golds(mentions: pl.DataFrame) -> set[str]:
    """The entities some train mention links to: never withheld, since a model trained on them has seen
    them in the KB (withholding one would test recall of the training set, not absence)."""
    return set(mentions.filter(pl.col("split") == "train")["gold_qid"].drop_nulls().to_list())


def withheld_entities(val: pl.DataFrame, train_gold: set[str], share: float, seed: int) -> set[str]:
    """Gold entities of val mentions (never gold in train), drawn in a seeded order until their mentions
    make up `share` of the val mentions."""
    target = share * val.height
    counts = val.filter(pl.col("gold_qid").is_not_null()).group_by("gold_qid").len()
    eligible = sorted((q, n) for q, n in counts.iter_rows() if q not in train_gold)
    random.Random(seed).shuffle(eligible)
    chosen, covered = set(), 0
    for qid, n in eligible:
        if covered >= target:
            break
        chosen.add(qid)
        covered += n
    return chosen


def without_entities(ranked: pl.DataFrame, withheld: set[str]) -> pl.DataFrame:
    """The lists as an index without `withheld` would return them: those rows dropped, ranks renumbered."""
    kept = ranked.filter(~pl.col("qid").is_in(list(withheld))).sort("mention_id", "rank")
    return kept.with_columns(rank=(pl.int_range(pl.len()).over("mention_id") + 1).cast(pl.Int32))


def list_features(
    ranked: pl.DataFrame, mention_ids: Sequence[str], names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """[mentions x features] in the order of `mention_ids`: each score column's top-1 value and the first
    column's margin to rank 2 (0 without a runner-up). A mention with no list gets NaN (always NIL).
    `names`: the features a fitted model reads (a missing value is NaN); None: every score column the list
    carries in full."""
    if names is None:
        columns = [c for c in SCORE_COLUMNS if c in ranked.columns and ranked[c].null_count() == 0]
    else:
        columns = [n for n in names if n != "margin"]
        absent = [c for c in columns if c not in ranked.columns]
        if absent:
            raise ValueError(f"the ranked lists have no {', '.join(absent)}: the NIL model was fitted on lists "
                             "that carry them (a learned reranker's list needs that reranker to run)")
    lists = ranked.sort("mention_id", "rank").group_by("mention_id", maintain_order=True).agg(
        *[pl.col(c).first().alias(c) for c in columns],
        margin=(pl.col(columns[0]).first() - pl.col(columns[0]).get(1, null_on_oob=True)).fill_null(0.0),
    )
    names = [*columns, "margin"]
    by_id = {row[0]: row[1:] for row in lists.select("mention_id", *names).iter_rows()}
    matrix = np.array([[np.nan if v is None else v for v in by_id.get(m, [None] * len(names))]
                       for m in mention_ids], np.float64).reshape(len(mention_ids), len(names))
    return matrix, names


@dataclass(frozen=True)
class NilModel:
    """Logistic regression on standardised list features; `threshold` on its probability."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float

    def probability(self, x: np.ndarray) -> np.ndarray:
        """P(NIL) per row; a row without a list (NaN) is NIL for certain."""
        z = (x - np.array(self.mean)) / np.array(self.scale)
        p = 1.0 / (1.0 + np.exp(-(np.nan_to_num(z) @ np.array(self.weights) + self.bias)))
        return np.where(np.isnan(x).any(axis=1), 1.0, p)

    def table(self) -> pl.DataFrame:
        """One row (NIL_MODEL): what the served model is, readable in DuckDB."""
        return pl.DataFrame({"features": [list(self.features)], "mean": [list(self.mean)],
                             "scale": [list(self.scale)], "weights": [list(self.weights)],
                             "bias": [self.bias], "threshold": [self.threshold]})

    @classmethod
    def from_table(cls, table: pl.DataFrame) -> NilModel:
        if table.height != 1:
            raise ValueError(f"a NIL model table holds one row, not {table.height}")
        row = table.row(0, named=True)
        return cls(tuple(row["features"]), tuple(row["mean"]), tuple(row["scale"]), tuple(row["weights"]),
                   float(row["bias"]), float(row["threshold"]))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias of an L2-regularised logistic regression by Newton's method (a few features: exact
    and fast, no solver to choose)."""
    design = np.hstack([x, np.ones((len(x), 1))])
    beta = np.zeros(design.shape[1])
    penalty = np.diag([l2] * x.shape[1] + [0.0])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-design @ beta))
        gradient = design.T @ (p - y) + penalty @ beta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return beta[:-1], float(beta[-1])


def best_threshold(probability: np.ndarray, is_nil: np.ndarray, top1_correct: np.ndarray | None = None,
                   max_cost: float | None = None) -> float:
    """The probability cut with the best NIL F1 (of equals, the lowest). With `max_cost`, only among the cuts
    that lose at most that many HITS@1 points on the in-KB mentions (right top-1 answers turned into NIL);
    when none does, a cut above every probability (never NIL)."""
    in_kb = ~is_nil
    best, best_f1 = float(np.nextafter(1.0, 2.0)), -1.0
    for cut in np.unique(probability):
        predicted = probability >= cut
        if max_cost is not None and top1_correct is not None:
            cost = 100 * float(np.sum(predicted & top1_correct & in_kb)) / max(float(in_kb.sum()), 1.0)
            if cost > max_cost:
                continue
        f1 = nil_scores(predicted, is_nil)["nil_f1"]
        if f1 > best_f1:
            best, best_f1 = float(cut), f1
    return best


def fit_nil_model(x: np.ndarray, is_nil: np.ndarray, names: Sequence[str], top1_correct: np.ndarray | None = None,
                  max_cost: float | None = None) -> NilModel:
    """The logistic model and its threshold (`best_threshold`, on the same mentions)."""
    usable = ~np.isnan(x).any(axis=1)
    x, is_nil = x[usable], is_nil[usable]
    correct = top1_correct[usable] if top1_correct is not None else None
    if len(set(is_nil.tolist())) < 2:
        raise ValueError("the NIL model needs both NIL and in-KB mentions to fit")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    weights, bias = fit_logistic((x - mean) / scale, is_nil.astype(np.float64))
    model = NilModel(tuple(names), tuple(mean), tuple(scale), tuple(weights), bias, 0.5)
    threshold = best_threshold(model.probability(x), is_nil, correct, max_cost)
    return NilModel(tuple(names), tuple(mean), tuple(scale), tuple(weights), bias, threshold)


def nil_scores(predicted_nil: np.ndarray, is_nil: np.ndarray) -> dict[str, float]:
    """NIL precision, recall and F1 (0 where undefined)."""
    tp = float(np.sum(predicted_nil & is_nil))
    precision = tp / max(float(np.sum(predicted_nil)), 1.0)
    recall = tp / max(float(np.sum(is_nil)), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"nil_precision": precision, "nil_recall": recall, "nil_f1": f1}


def outcome_metrics(is_nil: np.ndarray, predicted_nil: np.ndarray, top1_correct: np.ndarray) -> dict[str, float]:
    """NIL precision/recall/F1; HITS@1 on the in-KB mentions without the NIL decision and with it (an in-KB
    mention predicted NIL is a miss); accuracy over all mentions with NIL as an answer (right only on a NIL
    mention, which no entity answers rightly)."""
    in_kb = ~is_nil
    answered_right = top1_correct & ~predicted_nil
    return {
        **nil_scores(predicted_nil, is_nil),
        "n": float(len(is_nil)), "nil_mentions": float(is_nil.sum()),
        "in_kb_hits@1": 100 * float(top1_correct[in_kb].mean()) if in_kb.any() else float("nan"),
        "in_kb_hits@1_with_nil": 100 * float(answered_right[in_kb].mean()) if in_kb.any() else float("nan"),
        "accuracy_with_nil": 100 * float(np.where(is_nil, predicted_nil, answered_right).mean()),
    }


@dataclass(frozen=True)
class MadeNil:
    """Val lists with a seeded share of gold entities withheld: the features and truth the NIL model learns from."""

    withheld: set[str]
    mention_ids: list[str]
    is_nil: np.ndarray
    top1_correct: np.ndarray  # the list's top-1 is the gold entity (never, for a NIL mention)
    x: np.ndarray
    names: list[str]

    @classmethod
    def of(cls, ranked: pl.DataFrame, mentions: pl.DataFrame, train_gold: set[str], share: float,
           seed: int) -> MadeNil:
        withheld = withheld_entities(mentions, train_gold, share, seed)
        if not withheld:
            raise ValueError(f"no entity to withhold: of {mentions.height} val mentions, none has an entity that "
                             "is never gold in train")
        lists = without_entities(ranked, withheld)
        ids = mentions["mention_id"].to_list()
        x, names = list_features(lists, ids)
        top1 = dict(lists.filter(pl.col("rank") == 1).select("mention_id", "qid").iter_rows())
        correct = np.array([top1.get(m) == g for m, g in zip(ids, mentions["gold_qid"].to_list(), strict=True)])
        return cls(withheld, ids, mentions["gold_qid"].is_in(list(withheld)).to_numpy(), correct, x, names)


def fit_served_model(ranked: pl.DataFrame, mentions: pl.DataFrame, train_gold: set[str], share: float = 0.1,
                     seed: int = 0, max_cost: float | None = None) -> tuple[NilModel, dict[str, float]]:
    """The NIL model a served version carries: fitted on every val mention (the evaluation's draw of withheld
    entities), with its threshold; and what it was fitted on."""
    made = MadeNil.of(ranked, mentions, train_gold, share, seed)
    model = fit_nil_model(made.x, made.is_nil, made.names, made.top1_correct, max_cost)
    return model, {"val_mentions": len(made.mention_ids), "nil_mentions": int(made.is_nil.sum()),
                   "withheld_entities": len(made.withheld), "threshold": model.threshold}


def nil_decisions(model: NilModel, ranked: pl.DataFrame, mention_ids: Sequence[str],
                  threshold: float | None = None) -> pl.DataFrame:
    """NIL_DECISIONS for `mention_ids`: P(NIL) from their final lists and the decision at the model's threshold
    (or `threshold`). A mention with no list is NIL (nothing answers it); one whose list lacks a value the model
    reads (a mention the reranker's gate skipped) is left undecided: `nil_score` null, `nil` false."""
    x, _ = list_features(ranked, mention_ids, model.features)
    listed = set(ranked["mention_id"].to_list())
    no_list = np.array([m not in listed for m in mention_ids], bool)
    undecided = np.isnan(x).any(axis=1) & ~no_list
    probability = model.probability(x)
    cut = model.threshold if threshold is None else threshold
    return pl.DataFrame({
        "mention_id": list(mention_ids),
        "nil_score": [None if u else float(p) for p, u in zip(probability, undecided, strict=True)],
        "nil": (probability >= cut) & ~undecided,
    }, schema={"mention_id": pl.String, "nil_score": pl.Float64, "nil": pl.Boolean})


def out_of_kb_evaluation(
    ranked: pl.DataFrame, mentions: pl.DataFrame, train_gold: set[str], share: float = 0.1, seed: int = 0,
    max_cost: float | None = None,
) -> tuple[dict[str, float], pl.DataFrame]:
    """The out-of-KB evaluation of one final ranked list over `mentions` (val): `outcome_metrics` with the
    out-of-fold decisions, and one NIL_OUTCOMES row per mention for the precision-recall curve."""
    made = MadeNil.of(ranked, mentions, train_gold, share, seed)
    ids, is_nil, x, correct = made.mention_ids, made.is_nil, made.x, made.top1_correct
    folds = np.array([fold_of(m) for m in ids])
    probability, predicted = np.zeros(len(ids)), np.zeros(len(ids), bool)
    models = []
    for fold in (0, 1):
        rest = folds != fold
        if not 0 < is_nil[rest].sum() < rest.sum():
            raise ValueError(f"too few val mentions to fit the NIL model out of fold: {int(is_nil[rest].sum())} NIL of "
                             f"{int(rest.sum())} in fold {1 - fold} ({int(is_nil.sum())} NIL of {len(ids)} in all)")
        model = fit_nil_model(x[rest], is_nil[rest], made.names, correct[rest], max_cost)
        probability[folds == fold] = model.probability(x[folds == fold])
        predicted[folds == fold] = probability[folds == fold] >= model.threshold
        models.append(model)
    metrics = {**outcome_metrics(is_nil, predicted, correct), "withheld_entities": float(len(made.withheld)),
               "nil_threshold": float(np.mean([m.threshold for m in models]))}
    rows = pl.DataFrame({"mention_id": ids, "is_nil": is_nil, "nil_probability": probability,
                         "predicted_nil": predicted, "top1_correct": correct})
    return metrics, rows


def precision_recall_curve(outcomes: pl.DataFrame, points: int = 50) -> pl.DataFrame:
    """NIL precision, recall and in-KB HITS@1 at `points` cuts of the out-of-fold P(NIL) (NIL_OUTCOMES rows):
    what a user reads a threshold of their own from."""
    probability = outcomes["nil_probability"].to_numpy()
    is_nil, correct = outcomes["is_nil"].to_numpy(), outcomes["top1_correct"].to_numpy()
    rows = []
    for cut in np.unique(np.quantile(probability, np.linspace(0, 1, points))):
        predicted = probability >= cut
        scores = nil_scores(predicted, is_nil)
        in_kb = (correct & ~predicted)[~is_nil].mean() if (~is_nil).any() else float("nan")
        rows.append({"threshold": float(cut), "nil_precision": scores["nil_precision"],
                     "nil_recall": scores["nil_recall"], "in_kb_hits1": 100 * float(in_kb)})
    return pl.DataFrame(rows, schema={"threshold": pl.Float64, "nil_precision": pl.Float64,
                                      "nil_recall": pl.Float64, "in_kb_hits1": pl.Float64})
