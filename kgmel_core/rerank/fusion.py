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


def _padded(rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    values = torch.zeros((len(rows), width), dtype=torch.float64)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        values[i, : len(row)] = torch.as_tensor(np.asarray(row, np.float64))
        mask[i, : len(row)] = True
    return values, mask


def fit_fusion(
    reranker: Sequence[np.ndarray], retrieval: Sequence[np.ndarray], gold: Sequence[int | None], l2: float = 1e-3
) -> Fusion:
    """Maximum-likelihood weights over the lists whose gold is among the candidates (a small L2 keeps
    them finite when the scores separate the data); the reranker alone when no list has its gold."""
    rows = [i for i, g in enumerate(gold) if g is not None and len(reranker[i]) > 1]
    if not rows:
        return RERANKER_ONLY
    c, mask = _padded([reranker[i] for i in rows])
    r, _ = _padded([retrieval[i] for i in rows])
    target = torch.tensor([gold[i] for i in rows])
    scale_c = float(c[mask].std(correction=0)) or 1.0  # fit in standardised units
    scale_r = float(r[mask].std(correction=0)) or 1.0
    weights = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        z = (weights[0] * c / scale_c + weights[1] * r / scale_r).masked_fill(~mask, float("-inf"))
        loss = torch.nn.functional.cross_entropy(z, target) + l2 * (weights**2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    a, b = weights.detach().tolist()
    return Fusion(a / scale_c, b / scale_r)


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
