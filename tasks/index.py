"""Stages `index` (fused KB vectors + FAISS) and `retrieve` (top-K candidates for every mention).

Both encode with the settings the served retriever was trained with (its `train` manifest), never
with a live config, so an edited config cannot change how an existing model sees its inputs.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import IndexConfig
from kgmel_core.data.texts import HeadTexts
from kgmel_core.retrieval.features import subset_side
from kgmel_core.retrieval.index import (
    build_index_from_shards,
    candidates_table,
    exact_top_k,
    open_searcher,
    plan_index,
    recall_at_k,
    rescoring,
    save_index,
    search,
    search_file,
)
from kgmel_core.retrieval.training import encode_side
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, run_stage
from tasks.inputs import load_features, load_model
from tasks.parallel import map_shards

INDEX_SETTINGS = {"kind", "auto_threshold", "nlist", "nprobe", "pq_m", "pq_nbits", "hnsw_m", "hnsw_ef_search",
                  "rescore", "rescore_dtype"}
INDEX_FILE, VECTORS_FILE = "entities.faiss", "entities.vectors.npy"
RECALL_K = 16  # the recall an approximate index records on its held KB vectors (the retriever's usual top-K)
ENCODE_BATCH = 1 << 16  # entities fused (and written) at a time: the KB's vectors are never all in memory


def trained_heads(train: Artifact) -> HeadTexts:
    return HeadTexts.of(train.manifest["config"]["encoder"])


@task(name="index", **STAGE_TASK)
def index(ctx: PipelineContext, config: IndexConfig, train: Artifact, ingest: Artifact, embed: Artifact) -> Artifact:
    """Fuse every KB entity with the trained retriever and index the vectors."""

    def build(writer):
        model = load_model(train)
        features = load_features(ingest, embed, None, trained_heads(train), model.config.max_triples)
        entities, n, d = features.entities, len(features.entities), model.output_dim
        for start in range(0, n, ENCODE_BATCH):
            rows = torch.arange(start, min(start + ENCODE_BATCH, n))
            vectors = encode_side(model, subset_side(entities, rows), features.banks).numpy()
            writer.write_table(
                "fused_entities",
                pa.table({"qid": entities.ids[start : start + len(rows)], "vector": schemas.vector_column(vectors)}),
                schemas.fused_entities(d),
            )
        parts = writer.written_parts("fused_entities")

        def shards():  # read back one part at a time, in order
            for part in parts:
                yield schemas.vector_matrix(pl.read_parquet(part, glob=False)["vector"])  # the root may hold [ ? *

        vectors_path = writer.file_path(VECTORS_FILE) if plan_index(n, d, config).rescore else None
        built = build_index_from_shards(shards, n, d, config, vectors_path=vectors_path)
        plan = built.plan
        save_index(built.index, writer.file_path(INDEX_FILE))
        writer.stats.update(
            entities=n, dim=d, kind=plan.kind, nlist=plan.nlist, nprobe=plan.nprobe, pq_m=plan.pq_m,
            pq_nbits=config.pq_nbits if plan.pq_m else None, rescore=plan.rescore,
            rescore_dtype=config.rescore_dtype if plan.rescore else None,
        )
        if len(built.held):  # an approximate index says what it loses, on KB vectors it holds
            searcher = rescoring(built.index, vectors_path, plan.rescore)  # the index just built, not re-read
            found = search(searcher, built.held, RECALL_K)[1]
            exact = exact_top_k(shards(), built.held, RECALL_K)
            writer.stats.update(recall_at_16_held=round(recall_at_k(found, exact), 4), recall_queries=len(exact))

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
        qids = index_artifact.read("fused_entities")["qid"].to_list()
        shortlist = int(index_artifact.manifest["stats"].get("rescore") or 0)  # as built, never the live config
        vectors_path = str(index_artifact.file(VECTORS_FILE)) if shortlist else None
        if ctx.distributed:  # query shards on the Dask workers, each reading the index file once
            path = str(index_artifact.file(INDEX_FILE))
            shards = [(path, vectors_path, shortlist, part, config.top_k)
                      for part in np.array_split(vectors, ctx.shards) if len(part)]
            results = map_shards(True, search_file, shards)
            scores = np.concatenate([r[0] for r in results]) if results else np.zeros((0, 0), np.float32)
            ids = np.concatenate([r[1] for r in results]) if results else np.zeros((0, 0), np.int64)
            device = f"dask x{len(shards)} shards, cpu"
        else:
            searcher, device = open_searcher(index_artifact.file(INDEX_FILE), vectors_path, shortlist, config)
            scores, ids = search(searcher, vectors, config.top_k)
        frame = candidates_table(features.mentions.ids, scores, ids, qids)
        writer.write_table("candidates", frame, schemas.CANDIDATES)
        writer.stats.update(mentions=len(vectors), top_k=ids.shape[1], search_device=device)

    inputs = {"index": index_artifact, "train": train, "ingest": ingest, "embed": embed, "generation": generation}
    return run_stage(ctx, "retrieve", config.model_dump(include={"top_k"}), inputs, build)
