"""Training loop: in-batch contrastive learning, early stopping on the validation split.

The reference code keeps the epoch with the best *test* score; here the best validation epoch
is kept and the test split is touched once, by the evaluate stage.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from kgmel_core.config import TrainingConfig
from kgmel_core.metrics import gold_ranks, ranking_metrics
from kgmel_core.retrieval.device import resolve_device
from kgmel_core.retrieval.features import Banks, SideFeatures, subset_side
from kgmel_core.retrieval.losses import kgmel_loss
from kgmel_core.retrieval.model import KGMELRetriever


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.inference_mode()
def encode_side(
    model: KGMELRetriever, side: SideFeatures, banks: Banks, batch_size: int = 2048, device: str = "cpu"
) -> torch.Tensor:
    """Fused, normalised vectors for a whole side (eval mode, batched)."""
    was_training = model.training
    model.eval()
    parts = [
        model(side.batch(torch.arange(s, min(s + batch_size, len(side))), banks, device)).float().cpu()
        for s in range(0, len(side), batch_size)
    ]
    model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros((0, model.config.hidden_dim))


@dataclass
class TrainResult:
    state_dict: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_hits1: float = float("nan")
    best_val_mrr: float = float("nan")
    device: str = "cpu"


def validation_loss(model, mentions, gold_rows, entities, banks, config, device) -> float:
    """Contrastive loss on validation batches (reported, not used for selection)."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(mentions), config.batch_size):
            rows = torch.arange(start, min(start + config.batch_size, len(mentions)))
            if len(rows) < 2:
                continue
            gold = gold_rows[rows]
            unique, targets = torch.unique(gold, return_inverse=True)
            m = model(mentions.batch(rows, banks, device))
            e = model(entities.batch(unique, banks, device))
            total += float(kgmel_loss(m, e, targets.to(device), config.tau_cl, config.lambda_mm, config.lambda_ee))
            count += 1
    model.train()
    return total / count if count else float("nan")


def train_retriever(
    model: KGMELRetriever,
    banks: Banks,
    train_mentions: SideFeatures,
    train_gold_rows: torch.Tensor,
    entities: SideFeatures,
    val_mentions: SideFeatures,
    val_gold_rows: torch.Tensor,
    config: TrainingConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train with AdamW; keep the weights of the best validation epoch (HITS@1, then MRR).

    Gold rows index `entities` (the whole KB); mentions whose gold entity is missing from the KB
    must be filtered out by the caller, which counts them.
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model.to(device)
    banks = Banks(banks.texts.to(device), banks.text_index, banks.images.to(device), banks.image_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(state_dict=copy.deepcopy(model.state_dict()), device=device)
    best_key = (-1.0, -1.0)
    stale = 0
    val_present = val_gold_rows >= 0
    bar = tqdm(range(1, config.epochs + 1), desc="train retriever", unit="epoch")
    for epoch in bar:
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_mentions), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            if len(rows) < 2:
                continue  # a single mention has no in-batch negatives
            unique, targets = torch.unique(train_gold_rows[rows], return_inverse=True)
            m = model(train_mentions.batch(rows, banks, device))
            e = model(entities.batch(unique, banks, device))
            loss = kgmel_loss(m, e, targets.to(device), config.tau_cl, config.lambda_mm, config.lambda_ee)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
        entity_vectors = encode_side(model, entities, banks, device=device)
        mention_vectors = encode_side(model, val_mentions, banks, device=device)
        ranks, _ = gold_ranks(mention_vectors, entity_vectors, val_gold_rows.tolist())
        scores = ranking_metrics(ranks)
        row = {
            "epoch": epoch,
            "train_loss": total / max(batches, 1),
            "val_loss": validation_loss(
                model,
                subset_side(val_mentions, val_present.nonzero().squeeze(1)),
                val_gold_rows[val_present],
                entities,
                banks,
                config,
                device,
            ),
            "val_hits1": scores["hits@1"],
            "val_mrr": scores["mrr"],
            "seconds": time.perf_counter() - started,
        }
        result.history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_h1=f"{row['val_hits1']:.1f}")
        if on_epoch:
            on_epoch(row)
        key = (row["val_hits1"], row["val_mrr"])
        if key > best_key:
            best_key, stale = key, 0
            result.state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            result.best_epoch, result.best_val_hits1, result.best_val_mrr = epoch, key[0], key[1]
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(result.state_dict)
    model.to("cpu")
    return result
