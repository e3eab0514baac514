"""Training loop: contrastive learning with in-batch and mined hard negatives, early stopping on val.

The reference code keeps the epoch with the best *test* score; here the best validation epoch
is kept and the test split is touched once, by the evaluate stage.

Hard negatives: with a KB of thousands of people, the entities a mention is confused with (same
surname, same occupation) almost never share a random batch with it, so in-batch negatives alone
teach little beyond what the frozen encoder already knows. Before training, each training mention's
nearest entities by the frozen encoder are mined once; every batch adds a few of them to the entity
side as extra negatives.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from kgmel_core.config import RetrieverConfig, TrainingConfig
from kgmel_core.metrics import gold_ranks, ranking_metrics
from kgmel_core.retrieval.device import autocast, resolve_device, resolved_precision
from kgmel_core.retrieval.features import Banks, Features, SideFeatures, subset_side
from kgmel_core.retrieval.losses import kgmel_loss
from kgmel_core.retrieval.model import KGMELRetriever, optimizer_groups


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
    return torch.cat(parts) if parts else torch.zeros((0, model.output_dim))


@torch.inference_mode()
def mine_hard_negatives(
    banks: Banks, mentions: SideFeatures, gold_rows: torch.Tensor, entities: SideFeatures, pool: int
) -> torch.Tensor:
    """[M, pool] entity rows most similar to each mention by the frozen encoder (head texts and names,
    the strongest zero-shot score), gold excluded: same-surname people, same-name places."""
    normalize = torch.nn.functional.normalize

    def both_views(side: SideFeatures) -> torch.Tensor:
        return torch.cat([normalize(banks.texts[side.head], dim=-1), normalize(banks.texts[side.name], dim=-1)], 1)

    m, e = both_views(mentions), both_views(entities)
    k = max(1, min(pool, len(entities) - 1))
    out = []
    for start in range(0, len(m), 4096):
        scores = m[start : start + 4096] @ e.T
        gold = gold_rows[start : start + 4096]
        scores[torch.arange(len(gold)), gold.clamp_min(0)] = float("-inf")  # never a negative of itself
        out.append(scores.topk(k, dim=1).indices)
    return torch.cat(out)


@dataclass
class TrainResult:
    state_dict: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_hits1: float = float("nan")
    best_val_mrr: float = float("nan")
    device: str = "cpu"
    precision: str = "fp32"  # what the training steps multiplied in (`auto` resolved)


def _validate(model, entities, val_mentions, val_gold_rows, banks, config, device) -> dict:
    """Val HITS@1/MRR over the whole KB and the contrastive loss on val batches, from one encoding
    of the KB (the expensive part) shared by both."""
    entity_vectors = encode_side(model, entities, banks, device=device)
    mention_vectors = encode_side(model, val_mentions, banks, device=device)
    ranks, _ = gold_ranks(mention_vectors, entity_vectors, val_gold_rows.tolist())
    scores = ranking_metrics(ranks)
    present = (val_gold_rows >= 0).nonzero().squeeze(1)
    losses = []
    for start in range(0, len(present), config.batch_size):
        rows = present[start : start + config.batch_size]
        if len(rows) < 2:
            continue
        unique, targets = torch.unique(val_gold_rows[rows], return_inverse=True)
        m, e = mention_vectors[rows], entity_vectors[unique]
        losses.append(float(kgmel_loss(m, e, targets, config.tau_cl, config.lambda_mm, config.lambda_ee)))
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"), "val_hits1": scores["hits@1"],
            "val_mrr": scores["mrr"]}


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

    Validation runs every `validate_every` epochs (and on the last); `patience` counts validations
    without improvement. Gold rows index `entities` (the whole KB); mentions whose gold entity is
    missing from the KB must be filtered out by the caller, which counts them.
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model.to(device)
    precision = resolved_precision(config.precision, device)
    banks = Banks(banks.texts.to(device), banks.text_index, banks.images.to(device), banks.image_index)
    optimizer = torch.optim.AdamW(optimizer_groups(model, config.weight_decay), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    hard = (
        mine_hard_negatives(banks, train_mentions, train_gold_rows, entities, config.hard_negative_pool)
        if config.hard_negatives
        else None
    )
    result = TrainResult(state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, device=device,
                         precision=precision)
    best_key = (-1.0, -1.0)
    stale = 0
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
            gold = train_gold_rows[rows]
            entity_rows = gold
            if hard is not None:
                picks = torch.randint(hard.shape[1], (len(rows), config.hard_negatives), generator=generator)
                entity_rows = torch.cat([gold, hard[rows].gather(1, picks).reshape(-1)])
            unique, inverse = torch.unique(entity_rows, return_inverse=True)
            targets = inverse[: len(rows)]
            with autocast(precision, device):
                m = model(train_mentions.batch(rows, banks, device))
                e = model(entities.batch(unique, banks, device))
            loss = kgmel_loss(m.float(), e.float(), targets.to(device), config.tau_cl, config.lambda_mm,
                              config.lambda_ee)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
        row = {"epoch": epoch, "train_loss": total / max(batches, 1)}
        if epoch % config.validate_every == 0 or epoch == config.epochs:
            row.update(_validate(model, entities, val_mentions, val_gold_rows, banks, config, device))
        else:
            row.update(val_loss=float("nan"), val_hits1=float("nan"), val_mrr=float("nan"))
        row["seconds"] = time.perf_counter() - started
        result.history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_h1=f"{row['val_hits1']:.1f}")
        if on_epoch:
            on_epoch(row)
        if np.isnan(row["val_hits1"]):
            continue
        key = (row["val_hits1"], row["val_mrr"])
        if key > best_key:
            best_key, stale = key, 0
            result.state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            result.best_epoch, result.best_val_hits1, result.best_val_mrr = epoch, key[0], key[1]
        else:
            stale += 1
            if stale >= config.patience:
                break
    bar.close()
    model.load_state_dict(result.state_dict)
    model.to("cpu")
    return result


def split_rows(features: Features, split: str) -> torch.Tensor:
    return torch.tensor([i for i, s in enumerate(features.mention_split) if s == split], dtype=torch.long)


@dataclass
class TrainedRetriever:
    model: KGMELRetriever  # with the best validation epoch's weights
    result: TrainResult
    stats: dict  # what the train manifest records

    def history_table(self) -> pl.DataFrame:
        return pl.DataFrame(self.result.history).drop("seconds")  # wall-clock goes to stats: tables stay deterministic


def train_on_features(
    features: Features, retriever: RetrieverConfig, training: TrainingConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainedRetriever:
    """A new retriever trained on the train mentions whose gold entity is in the KB (the others are
    counted), early-stopped on the val mentions."""
    train_rows, val_rows = split_rows(features, "train"), split_rows(features, "val")
    gold = features.mention_gold_rows
    train_rows_in_kb = train_rows[gold[train_rows] >= 0]
    if len(train_rows_in_kb) < 2:
        raise ValueError(
            f"need at least 2 training mentions with their gold entity in the KB, have {len(train_rows_in_kb)}"
        )
    if len(val_rows) == 0:
        raise ValueError("no 'val' mentions: early stopping selects on the validation split")
    seed_everything(training.seed)  # weight init too, or reruns differ
    model = KGMELRetriever(features.banks.text_dim, features.banks.image_dim, retriever)
    result = train_retriever(
        model, features.banks, subset_side(features.mentions, train_rows_in_kb), gold[train_rows_in_kb],
        features.entities, subset_side(features.mentions, val_rows), gold[val_rows], training, on_epoch=on_epoch,
    )
    stats = {
        "best_epoch": result.best_epoch, "best_val_hits1": result.best_val_hits1, "best_val_mrr": result.best_val_mrr,
        "epochs_run": len(result.history), "epoch_seconds": [round(row["seconds"], 3) for row in result.history],
        "device": result.device, "precision": result.precision, "train_mentions": len(train_rows_in_kb),
        "train_mentions_gold_not_in_kb": len(train_rows) - len(train_rows_in_kb), "val_mentions": len(val_rows),
        "entities": len(features.entities),
    }
    return TrainedRetriever(model, result, stats)
