"""Contrastive losses of KGMEL: mention->entity InfoNCE plus intra-modal terms."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def info_nce(queries: Tensor, keys: Tensor, targets: Tensor, tau: float) -> Tensor:
    """Cross-entropy of each query against all keys; `targets[i]` is the column of its positive.

    Callers deduplicate keys, so two mentions of the same entity share one positive column
    instead of being pushed apart as each other's negatives (a fault of the reference code).
    """
    return F.cross_entropy(queries @ keys.T / tau, targets)


def self_info_nce(x: Tensor, groups: Tensor, tau: float) -> Tensor:
    """InfoNCE of a set against itself: each item is its own positive, items of other groups are
    negatives, and items of the same group (same gold entity) are neither."""
    logits = x @ x.T / tau
    same = groups.unsqueeze(0) == groups.unsqueeze(1)
    off_diagonal_same = same & ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    logits = logits.masked_fill(off_diagonal_same, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, torch.arange(len(x), device=x.device))


def kgmel_loss(
    mentions: Tensor,
    entities: Tensor,
    targets: Tensor,
    tau: float,
    lambda_mm: float,
    lambda_ee: float,
) -> Tensor:
    """InfoNCE(mention, gold entity) + lambda_mm * InfoNCE(m, m) + lambda_ee * InfoNCE(e, e).

    `entities` holds each gold entity of the batch once; `targets[i]` is mention i's row in it.
    """
    loss = info_nce(mentions, entities, targets, tau)
    if lambda_mm:
        loss = loss + lambda_mm * self_info_nce(mentions, targets, tau)
    if lambda_ee:
        loss = loss + lambda_ee * self_info_nce(entities, torch.arange(len(entities), device=entities.device), tau)
    return loss
