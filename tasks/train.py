"""Stage `train`: the KGMEL retriever, early-stopped on the validation split."""

from __future__ import annotations

import polars as pl
import torch
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import EncoderConfig, RetrieverConfig, TrainingConfig, key_config
from kgmel_core.data.texts import HeadTexts
from kgmel_core.retrieval.features import Features, subset_side
from kgmel_core.retrieval.model import KGMELRetriever
from kgmel_core.retrieval.training import seed_everything, train_retriever
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.inputs import load_features


def split_rows(features: Features, split: str) -> torch.Tensor:
    return torch.tensor([i for i, s in enumerate(features.mention_split) if s == split], dtype=torch.long)


@task(name="train", **STAGE_TASK)
def train(
    ctx: PipelineContext,
    retriever: RetrieverConfig,
    training: TrainingConfig,
    encoder: EncoderConfig,
    ingest: Artifact,
    embed: Artifact,
    generation: Artifact | None = None,
) -> Artifact:
    """The manifest's config holds everything later jobs must encode mentions with, so `reindex-kb`
    and `link` take those settings from the model they serve, not from a live config."""
    config = {
        "retriever": retriever.model_dump(),
        "training": key_config(training),
        "encoder": key_config(encoder),
    }

    def build(writer):
        heads = HeadTexts.of(encoder.model_dump())
        features = load_features(ingest, embed, generation, heads, retriever.max_triples)
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
            model,
            features.banks,
            subset_side(features.mentions, train_rows_in_kb),
            gold[train_rows_in_kb],
            features.entities,
            subset_side(features.mentions, val_rows),
            gold[val_rows],
            training,
            on_epoch=lambda row: logger().debug("epoch %s", row),  # the progress bar shows it; history keeps it
        )
        model.save(writer.file_path("retriever.pt"))  # train_retriever leaves the best epoch's weights in it
        history = pl.DataFrame(result.history).drop("seconds")  # wall-clock goes to stats: tables stay deterministic
        writer.write_table("training_history", history, schemas.TRAINING_HISTORY)
        logger().info(
            "train: best epoch %d of %d, val HITS@1 %.2f, MRR %.3f",
            result.best_epoch, len(result.history), result.best_val_hits1, result.best_val_mrr,
        )
        writer.stats.update(
            best_epoch=result.best_epoch,
            best_val_hits1=result.best_val_hits1,
            best_val_mrr=result.best_val_mrr,
            epochs_run=len(result.history),
            epoch_seconds=[round(row["seconds"], 3) for row in result.history],
            device=result.device,
            precision=result.precision,
            train_mentions=len(train_rows_in_kb),
            train_mentions_gold_not_in_kb=len(train_rows) - len(train_rows_in_kb),
            val_mentions=len(val_rows),
            entities=len(features.entities),
        )

    return run_stage(ctx, "train", config, {"ingest": ingest, "embed": embed, "generation": generation}, build)
