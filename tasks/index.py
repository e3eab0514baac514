"""Stages `index` (fused KB vectors + FAISS) and `retrieve` (top-K candidates for every mention).

Both encode with the settings the served retriever was trained with (its `train` manifest), never
with a live config, so an edited config cannot change how an existing model sees its inputs.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import IndexConfig
from kgmel_core.data.texts import HeadTexts
from kgmel_core.retrieval.index import build_index, load_index, save_index, search, to_search_device
from kgmel_core.retrieval.training import encode_side
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, run_stage
from tasks.inputs import load_features, load_model

INDEX_SETTINGS = {"kind", "nlist", "nprobe", "hnsw_m", "hnsw_ef_search"}


def trained_heads(train: Artifact) -> HeadTexts:
    return HeadTexts.of(train.manifest["config"]["encoder"])


@task(name="index", **STAGE_TASK)
def index(ctx: PipelineContext, config: IndexConfig, train: Artifact, ingest: Artifact, embed: Artifact) -> Artifact:
    """Fuse every KB entity with the trained retriever and index the vectors."""

    def build(writer):
        model = load_model(train)
        features = load_features(ingest, embed, None, trained_heads(train), model.config.max_triples)
        vectors = encode_side(model, features.entities, features.banks).numpy()
        writer.write_table(
            "fused_entities",
            pa.table({"qid": features.entities.ids, "vector": schemas.vector_column(vectors)}),
            schemas.fused_entities(vectors.shape[1]),
        )
        save_index(build_index(vectors, config), writer.file_path("entities.faiss"))
        writer.stats.update(entities=len(vectors), dim=int(vectors.shape[1]), kind=config.kind)

    settings = config.model_dump(include=INDEX_SETTINGS)
    return run_stage(ctx, "index", settings, {"train": train, "ingest": ingest, "embed": embed}, build)


@task(name="retrieve", **STAGE_TASK)
def retrieve(
    ctx: PipelineContext,
    config: IndexConfig,
    index_artifact: Artifact,
    train: Artifact,
    ingest: Artifact,
    embed: Artifact,
    generation: Artifact | None = None,
) -> Artifact:
    """Top-K candidates for every mention (all splits) from the FAISS index."""

    def build(writer):
        model = load_model(train)
        features = load_features(ingest, embed, generation, trained_heads(train), model.config.max_triples)
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

    inputs = {"index": index_artifact, "train": train, "ingest": ingest, "embed": embed, "generation": generation}
    return run_stage(ctx, "retrieve", config.model_dump(include={"top_k"}), inputs, build)
