"""Stage `train`: the KGMEL retriever, early-stopped on the validation split."""

from __future__ import annotations

from prefect import task

from kgmel_core import schemas
from kgmel_core.config import EncoderConfig, RetrieverConfig, TrainingConfig, key_config
from kgmel_core.data.texts import HeadTexts
from kgmel_core.retrieval.training import train_on_features
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.inputs import load_features


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
        features = load_features(ingest, embed, generation, HeadTexts.of(encoder.model_dump()), retriever.max_triples)
        trained = train_on_features(features, retriever, training,
                                    on_epoch=lambda row: logger().debug("epoch %s", row))  # the bar shows it
        trained.model.save(writer.file_path("retriever.pt"))
        writer.write_table("training_history", trained.history_table(), schemas.TRAINING_HISTORY)
        result = trained.result
        logger().info(
            "train: best epoch %d of %d, val HITS@1 %.2f, MRR %.3f",
            result.best_epoch, len(result.history), result.best_val_hits1, result.best_val_mrr,
        )
        writer.stats.update(trained.stats)

    return run_stage(ctx, "train", config, {"ingest": ingest, "embed": embed, "generation": generation}, build)
