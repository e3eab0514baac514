"""Stages `train`, `index` and `retrieve`: the trained retriever, its FAISS index, top-K candidates."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import EncoderConfig, IndexConfig, RetrieverConfig, TrainingConfig
from kgmel_core.retrieval.features import Features, assemble, subset_side
from kgmel_core.retrieval.index import build_index, load_index, save_index, search, to_search_device
from kgmel_core.retrieval.model import KGMELRetriever
from kgmel_core.retrieval.training import encode_side, seed_everything, train_retriever
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, input_keys, logger, run_stage

TRAIN_VERSION = "1"
INDEX_VERSION = "1"
RETRIEVE_VERSION = "1"


def load_features(
    ingest: Artifact, embed: Artifact, generation: Artifact | None, encoder: EncoderConfig, max_triples: int
) -> Features:
    return assemble(
        ingest.read("mentions"),
        ingest.read("entities"),
        ingest.read("kb_triples"),
        generation.read("mention_triples") if generation is not None else None,
        embed.read("text_embeddings"),
        embed.read("image_embeddings"),
        encoder.mention_text,
        max_triples,
    )


def load_model(train: Artifact) -> KGMELRetriever:
    checkpoint = torch.load(train.file("retriever.pt"), map_location="cpu", weights_only=False)
    model = KGMELRetriever(
        checkpoint["text_dim"], checkpoint["image_dim"], RetrieverConfig.model_validate(checkpoint["retriever_config"])
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def _rows(features: Features, split: str) -> torch.Tensor:
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
    inputs = input_keys(ingest=ingest, embed=embed, generation=generation)
    config = {
        "retriever": retriever.model_dump(),
        "training": training.model_dump(exclude={"device"}),
        "mention_text": encoder.mention_text,
    }

    def build(writer):
        features = load_features(ingest, embed, generation, encoder, retriever.max_triples)
        train_rows, val_rows = _rows(features, "train"), _rows(features, "val")
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
            on_epoch=lambda row: logger().info("epoch %s", row),
        )
        torch.save(
            {
                "state_dict": result.state_dict,
                "text_dim": features.banks.text_dim,
                "image_dim": features.banks.image_dim,
                "retriever_config": retriever.model_dump(),
            },
            writer.file_path("retriever.pt"),
        )
        writer.write_table("training_history", pl.DataFrame(result.history), schemas.TRAINING_HISTORY)
        writer.stats.update(
            best_epoch=result.best_epoch,
            best_val_hits1=result.best_val_hits1,
            best_val_mrr=result.best_val_mrr,
            epochs_run=len(result.history),
            device=result.device,
            train_mentions=len(train_rows_in_kb),
            train_mentions_gold_not_in_kb=len(train_rows) - len(train_rows_in_kb),
            val_mentions=len(val_rows),
            entities=len(features.entities),
        )

    return run_stage(ctx, "train", TRAIN_VERSION, config, inputs, build)


@task(name="index", **STAGE_TASK)
def index(
    ctx: PipelineContext,
    config: IndexConfig,
    encoder: EncoderConfig,
    train: Artifact,
    ingest: Artifact,
    embed: Artifact,
) -> Artifact:
    """Fuse every KB entity with the trained retriever and index the vectors."""
    inputs = input_keys(train=train, ingest=ingest, embed=embed)
    stage_config = config.model_dump(include={"kind", "nlist", "nprobe", "hnsw_m", "hnsw_ef_search"})

    def build(writer):
        model = load_model(train)
        features = load_features(ingest, embed, None, encoder, model.config.max_triples)
        vectors = encode_side(model, features.entities, features.banks).numpy()
        writer.write_table(
            "fused_entities",
            pa.table({"qid": features.entities.ids, "vector": schemas.vector_column(vectors)}),
            schemas.fused_entities(vectors.shape[1]),
        )
        save_index(build_index(vectors, config), writer.file_path("entities.faiss"))
        writer.stats.update(entities=len(vectors), dim=int(vectors.shape[1]), kind=config.kind)

    return run_stage(ctx, "index", INDEX_VERSION, stage_config, inputs, build)


@task(name="retrieve", **STAGE_TASK)
def retrieve(
    ctx: PipelineContext,
    config: IndexConfig,
    encoder: EncoderConfig,
    index_artifact: Artifact,
    train: Artifact,
    ingest: Artifact,
    embed: Artifact,
    generation: Artifact | None = None,
) -> Artifact:
    """Top-K candidates for every mention (all splits) from the FAISS index."""
    inputs = input_keys(index=index_artifact, train=train, ingest=ingest, embed=embed, generation=generation)

    def build(writer):
        model = load_model(train)
        features = load_features(ingest, embed, generation, encoder, model.config.max_triples)
        vectors = encode_side(model, features.mentions, features.banks).numpy()
        writer.write_table(
            "fused_mentions",
            pa.table(
                {
                    "mention_id": features.mentions.ids,
                    "split": features.mention_split,
                    "vector": schemas.vector_column(vectors),
                }
            ),
            schemas.fused_mentions(vectors.shape[1]),
        )
        faiss_index, device = to_search_device(load_index(index_artifact.file("entities.faiss")), config)
        qids = index_artifact.read("fused_entities")["qid"].to_list()
        scores, ids = search(faiss_index, vectors, config.top_k)
        k = ids.shape[1]
        frame = pl.DataFrame(
            {
                "mention_id": np.repeat(np.array(features.mentions.ids, dtype=object), k).tolist(),
                "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(vectors)),
                "row": ids.reshape(-1),
                "score": scores.reshape(-1).astype(np.float32),
            }
        ).filter(pl.col("row") >= 0)
        frame = frame.with_columns(qid=pl.Series(qids, dtype=pl.String).gather(frame["row"]))
        writer.write_table("candidates", frame, schemas.CANDIDATES)
        writer.stats.update(mentions=len(vectors), top_k=k, search_device=device)

    return run_stage(ctx, "retrieve", RETRIEVE_VERSION, config.model_dump(include={"top_k"}), inputs, build)
