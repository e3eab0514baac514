"""Score fusion: the final ranking of a mention's candidates from the retriever's score and the
reranker's, as a conditional logit `z = a * reranker + b * retrieval` fitted on val.

Why both: the retriever saw the whole train split through its own objective and is already right on
most mentions; the reranker reads what it cannot (sentence against description). Neither alone is
best, and their scales differ (cosines a few hundredths apart against logits of several units), so
the two weights are fitted by maximum likelihood of the gold candidate, which also makes
softmax(z) a calibrated probability over the list.

Fitted on val and reported on val: each val mention is ranked with weights fitted on the *other*
fold (out-of-fold, two folds by a hash of its id), so the reported gain is not fitted to the mentions
it is measured on; every other mention (test, new mentions) uses the weights fitted on all of val.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Fusion:
    reranker: float  # weight of the reranker's score
    retrieval: float  # weight of the retriever's score

    def apply(self, reranker: np.ndarray, retrieval: np.ndarray) -> np.ndarray:
        return self.reranker * np.asarray(reranker, np.float64) + self.retrieval * np.asarray(retrieval, np.float64)


RERANKER_ONLY = Fusion(1.0, 0.0)


def fit_logit(
    features: Sequence[np.ndarray], gold: Sequence[int | None], l2: float = 1e-3, start: Sequence[float] | None = None
) -> tuple[np.ndarray, float]:
    """Conditional-logit weights over lists of candidates (`features[i]`: one row of F features a
    candidate; z = features @ weights, a softmax over the list) by maximum likelihood of the gold, over the
    lists whose gold is among their candidates; and the penalised loss at them. Fitted in standardised
    units from `start` (zeros by default; a small L2 keeps the weights finite when the features separate
    the data), returned in the features' own units. Needs at least one list with its gold."""
    rows = [i for i, g in enumerate(gold) if g is not None and len(features[i]) > 1]
    if not rows:
        raise ValueError("no list has its gold among two or more candidates: nothing to fit")
    width, columns = max(len(features[i]) for i in rows), np.asarray(features[rows[0]]).shape[1]
    values = torch.zeros((len(rows), width, columns), dtype=torch.float64)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for at, i in enumerate(rows):
        values[at, : len(features[i])] = torch.as_tensor(np.asarray(features[i], np.float64))
        mask[at, : len(features[i])] = True
    target = torch.tensor([gold[i] for i in rows])
    scale = values[mask].std(0, correction=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant feature: its weight is moot
    standardised = values / scale
    weights = torch.tensor(list(start) if start is not None else [0.0] * columns, dtype=torch.float64,
                           requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        z = (standardised @ w).masked_fill(~mask, float("-inf"))
        return torch.nn.functional.cross_entropy(z, target) + l2 * (w**2).sum()

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(weights)
        loss.backward()
        return loss

    optimizer.step(objective)
    fitted = weights.detach()
    return (fitted / scale).numpy(), float(loss_of(fitted))


def fit_fusion(
    reranker: Sequence[np.ndarray], retrieval: Sequence[np.ndarray], gold: Sequence[int | None], l2: float = 1e-3
) -> Fusion:
    """The two weights by `fit_logit`, from the reranker alone; the reranker alone when no list has its gold."""
    if not any(g is not None and len(reranker[i]) > 1 for i, g in enumerate(gold)):
        return RERANKER_ONLY
    features = [np.stack([np.asarray(c, np.float64), np.asarray(r, np.float64)], 1)
                for c, r in zip(reranker, retrieval, strict=True)]
    (a, b), _ = fit_logit(features, gold, l2, start=(1.0, 0.0))
    return Fusion(float(a), float(b))


def fold_of(mention_id: str, folds: int = 2) -> int:
    """A mention's fold, from a hash of its id: the same on every run and machine."""
    return int(hashlib.sha256(mention_id.encode()).hexdigest()[:8], 16) % folds


def out_of_fold(
    mention_ids: Sequence[str], reranker: Sequence[np.ndarray], retrieval: Sequence[np.ndarray],
    gold: Sequence[int | None], folds: int = 2,
) -> list[Fusion]:
    """For each mention, the fusion fitted on the mentions of the other folds."""
    fold = [fold_of(m, folds) for m in mention_ids]
    fitted = []
    for f in range(folds):
        rest = [i for i, x in enumerate(fold) if x != f]
        fitted.append(fit_fusion([reranker[i] for i in rest], [retrieval[i] for i in rest], [gold[i] for i in rest]))
    return [fitted[f] for f in fold]
