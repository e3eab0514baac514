"""Stages `index` (fused KB vectors + FAISS) and `retrieve` (top-K candidates for every mention).

Both encode with the settings the served retriever was trained with (its `train` manifest), never
with a live config, so an edited config cannot change how an existing model sees its inputs.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import IndexConfig
from kgmel_core.data.texts import HeadTexts
from kgmel_core.retrieval.features import subset_side
from kgmel_core.retrieval.growth import (
    Decision,
    GrowthRule,
    KBChanges,
    coarse_distance,
    decide,
    entity_signatures,
    kb_changes,
)
from kgmel_core.retrieval.index import (
    RECALL_K,
    IndexPlan,
    append_vectors,
    build_index_from_shards,
    candidates_table,
    exact_top_k,
    held_recall,
    ivf_centroids,
    kept_measured_choice,
    load_index,
    low_recall_advice,
    open_searcher,
    plan_index,
    sample_rows,
    save_index,
    search,
    search_file,
)
from kgmel_core.retrieval.rescore import extend_vectors, write_rows
from kgmel_core.retrieval.training import encode_side
from storage import Artifact, ArtifactDamaged, StageRecord
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.inputs import load_features, load_model
from tasks.parallel import map_shards

GROWTH_SETTINGS = {"append_max_growth", "append_max_drift"}  # when reindex-kb appends instead of rebuilding
INDEX_SETTINGS = {"kind", "auto_threshold", "nlist", "nprobe", "pq_m", "pq_nbits", "sq_bits", "hnsw_m",
                  "hnsw_ef_search", "rescore", "rescore_dtype"} | GROWTH_SETTINGS
INDEX_FILE, VECTORS_FILE = "entities.faiss", "entities.vectors.npy"
ENCODE_BATCH = 1 << 16  # entities fused (and written) at a time: the KB's vectors are never all in memory
HELD_ROWS = 200  # KB vectors an approximate index is measured on
DRIFT_SAMPLE = 2000  # new entities fused to measure their drift before deciding to append them


def trained_heads(train: Artifact) -> HeadTexts:
    return HeadTexts.of(train.manifest["config"]["encoder"])


@task(name="index", **STAGE_TASK)
def index(
    ctx: PipelineContext,
    config: IndexConfig,
    train: Artifact,
    ingest: Artifact,
    embed: Artifact,
    previous: Artifact | None = None,
) -> Artifact:
    """Fuse every KB entity with the trained retriever and index the vectors.

    Given the index a served model uses (`previous`: reindex-kb), a KB that only gained entities gets
    them appended to a copy of that index when `growth.decide` allows, and a KB that did not change
    keeps that index; otherwise the index is built from scratch."""
    if previous is not None and _indexes_the_same(previous, config, train, ingest, embed):
        logger().info("stage index: the KB has not changed since index %s: kept", previous.key)
        ctx.run_log.add(StageRecord("index", previous.key, True, previous.rows, 0.0))
        return previous

    def build(writer):
        model = load_model(train)
        n = ingest.tables["entities"]
        plan = plan_index(n, model.output_dim, config)
        growth = {"mode": "build", "built_rows": n, "appended_since_build": 0}
        if previous is not None:
            measured = previous.manifest["stats"].get("auto_measured")
            plan = kept_measured_choice(plan, _built_plan(previous), measured)
            previous_index = functools.cache(lambda: load_index(previous.file(INDEX_FILE)))  # read once, if at all
            decision, changes = _growth_decision(ctx, config, model, train, ingest, embed, previous, previous_index,
                                                 plan)
            growth = {"mode": "append" if decision.append else "rebuild", "reason": decision.reason,
                      "previous": previous.key, "added": len(changes.added) if changes else None,
                      "changed": changes.changed if changes else None, "removed": changes.removed if changes else None}
            logger().info("stage index: %s (%s)", growth["mode"], decision.reason)
            if decision.append:
                _append(ctx, writer, config, model, train, ingest, embed, previous, previous_index(), plan, changes,
                        growth)
                return
            growth.update(built_rows=n, appended_since_build=0)
        _build(writer, config, model, train, ingest, embed, growth)

    settings = config.model_dump(include=INDEX_SETTINGS)
    inputs = {"train": train, "ingest": ingest, "embed": embed, "previous": previous}
    return run_stage(ctx, "index", settings, inputs, build)


def _fuse(writer, model, features) -> None:
    """Fuse `features.entities` with the retriever, appending them to `fused_entities` a batch at a time."""
    entities, n, d = features.entities, len(features.entities), model.output_dim
    for start in range(0, n, ENCODE_BATCH):
        rows = torch.arange(start, min(start + ENCODE_BATCH, n))
        vectors = encode_side(model, subset_side(entities, rows), features.banks).numpy()
        writer.write_table(
            "fused_entities",
            pa.table({"qid": entities.ids[start : start + len(rows)], "vector": schemas.vector_column(vectors)}),
            schemas.fused_entities(d),
        )


def _shards(parts: list[Path]):
    """The fused vectors of `parts`, read back one part at a time, in order."""
    return lambda: (schemas.vector_matrix(pl.read_parquet(part, glob=False)["vector"]) for part in parts)


def _build(writer, config: IndexConfig, model, train: Artifact, ingest: Artifact, embed: Artifact,
           growth: dict) -> None:
    _fuse(writer, model, load_features(ingest, embed, None, trained_heads(train), model.config.max_triples))
    n, d = writer.tables["fused_entities"], model.output_dim
    shards = _shards(writer.written_parts("fused_entities"))  # the root may hold [ ? *: no globbing
    vectors_path = writer.file_path(VECTORS_FILE) if plan_index(n, d, config).rescore else None
    built = build_index_from_shards(shards, n, d, config, vectors_path=vectors_path)
    save_index(built.index, writer.file_path(INDEX_FILE))
    if built.measured:
        logger().info("stage index: auto built %s (held recall@16 of each plan tried: %s)", built.plan.kind,
                      built.measured)
    _record(writer, config, built.index, built.plan, n, d, vectors_path, shards, built.held, growth,
            exact=built.held_exact, measured=built.measured)


def _record(writer, config: IndexConfig, built, plan: IndexPlan, n: int, d: int, vectors_path: Path | None, shards,
            held: np.ndarray, growth: dict, exact: np.ndarray | None = None, measured: dict | None = None) -> None:
    """The manifest's account of the index: its plan, how it came about (with `auto`'s measurements, where
    it chose by them), and what an approximate one loses (recall on KB vectors it holds) and how close
    its lists fit them (the drift rule's yardstick). `exact`: the held rows' exact top-16, if known."""
    writer.stats.update(
        entities=n, dim=d, kind=plan.kind, nlist=plan.nlist, nprobe=plan.nprobe, pq_m=plan.pq_m,
        pq_nbits=config.pq_nbits if plan.pq_m else None, sq_bits=config.sq_bits if plan.kind == "ivfsq" else None,
        rescore=plan.rescore,
        rescore_dtype=config.rescore_dtype if plan.rescore else None, growth=growth, auto_measured=measured or None,
    )
    if len(held):
        exact = exact if exact is not None else exact_top_k(shards(), held, RECALL_K)
        recall = held_recall(built, plan, vectors_path, held, exact)  # the index just built, not re-read
        writer.stats.update(recall_at_16_held=round(recall, 4), recall_queries=len(exact))
        advice = low_recall_advice(plan, recall)
        if advice:
            logger().warning("stage index: %s", advice)
        centroids = ivf_centroids(built)
        if centroids is not None:
            writer.stats.update(coarse_distance_held=round(coarse_distance(centroids, held), 6))


def _indexes_the_same(previous: Artifact, config: IndexConfig, train: Artifact, ingest: Artifact,
                      embed: Artifact) -> bool:
    store = previous.store
    return (store.input(previous, "train").key == train.key and store.input(previous, "ingest").key == ingest.key
            and store.input(previous, "embed").key == embed.key
            and _same_settings(previous, config, INDEX_SETTINGS))


def _same_settings(previous: Artifact, config: IndexConfig, names: set[str]) -> bool:
    wanted = config.model_dump(include=names)
    return {name: previous.manifest["config"].get(name) for name in wanted} == wanted


def _built_plan(previous: Artifact) -> IndexPlan:
    stats = previous.manifest["stats"]
    return IndexPlan(stats["kind"], stats.get("nlist") or 0, stats.get("nprobe") or 0, stats.get("pq_m") or 0,
                     0, stats.get("rescore") or 0)


def _history(previous: Artifact) -> tuple[int, int]:
    """(rows of the last full build, rows appended since) behind `previous`."""
    stats = previous.manifest["stats"]
    history = stats.get("growth") or {}
    return history.get("built_rows", stats["entities"]), history.get("appended_since_build", 0)


def _growth_decision(ctx: PipelineContext, config: IndexConfig, model, train: Artifact, ingest: Artifact,
                     embed: Artifact, previous: Artifact, previous_index, plan: IndexPlan
                     ) -> tuple[Decision, KBChanges | None]:
    """May the entities the KB gained be appended to `previous`? The cheap reasons first; the drift is
    measured on a sample of the new entities, fused with the retriever, against the previous lists."""
    if ctx.store.input(previous, "train").key != train.key:
        return Decision(False, f"index {previous.key} was built with another retriever"), None
    if not _same_settings(previous, config, INDEX_SETTINGS - GROWTH_SETTINGS):
        return Decision(False, f"the index settings differ from index {previous.key}'s"), None
    before = ctx.store.input(previous, "ingest")
    changes = kb_changes(entity_signatures(before.read("entities"), before.read("kb_triples")),
                         entity_signatures(ingest.read("entities"), ingest.read("kb_triples")))
    stats = previous.manifest["stats"]
    built = _built_plan(previous)
    rule = GrowthRule(config.append_max_growth, config.append_max_drift)
    facts = (built, plan, changes, *_history(previous), rule)
    decision = decide(*facts)
    if not decision.append or not changes.added or not stats.get("coarse_distance_held"):
        return decision, changes
    centroids = ivf_centroids(previous_index())
    sample = np.random.default_rng(0).choice(changes.added, min(DRIFT_SAMPLE, len(changes.added)), replace=False)
    features = load_features(ingest, embed, None, trained_heads(train), model.config.max_triples, sample.tolist())
    vectors = encode_side(model, features.entities, features.banks).numpy()
    drift = coarse_distance(centroids, vectors) / stats["coarse_distance_held"]
    return decide(*facts, drift=round(drift, 3)), changes


def _append(ctx: PipelineContext, writer, config: IndexConfig, model, train: Artifact, ingest: Artifact,
            embed: Artifact, previous: Artifact, index_now, plan: IndexPlan, changes: KBChanges,
            growth: dict) -> None:
    """A copy of `previous` with the new entities added: its fused rows copied part by part, its FAISS
    index (`index_now`, read from it) extended, its vectors file copied and extended; no list is retrained."""
    n_before, d = index_now.ntotal, model.output_dim
    if n_before != previous.manifest["stats"]["entities"]:
        raise ArtifactDamaged(f"index {previous.key}: its FAISS file holds {n_before} vectors, its manifest "
                              f"{previous.manifest['stats']['entities']}")
    for part in previous.parts("fused_entities"):
        writer.copy_part("fused_entities", lambda path, part=part: ctx.store.fsx.get(part, path))
    copied = len(writer.written_parts("fused_entities"))
    if changes.added:
        _fuse(writer, model, load_features(ingest, embed, None, trained_heads(train), model.config.max_triples,
                                           changes.added))
    parts = writer.written_parts("fused_entities")
    added, n = _shards(parts[copied:]), writer.tables["fused_entities"]
    vectors_path = writer.file_path(VECTORS_FILE) if plan.rescore else None
    with open(vectors_path, "wb") if vectors_path else contextlib.nullcontext() as vectors:
        if vectors:
            extend_vectors(previous.file(VECTORS_FILE), vectors, n_before, d, n - n_before, config.rescore_dtype)
        for shard in added():
            append_vectors(index_now, shard)
            if vectors:
                write_rows(vectors, shard, config.rescore_dtype)
    save_index(index_now, writer.file_path(INDEX_FILE))
    built_rows, appended_before = _history(previous)
    growth.update(built_rows=built_rows, appended_since_build=appended_before + n - n_before)
    shards = _shards(parts)
    held = sample_rows(shards(), n, HELD_ROWS) if plan.train_size else np.zeros((0, d), np.float32)
    _record(writer, config, index_now, plan, n, d, vectors_path, shards, held, growth,
            measured=previous.manifest["stats"].get("auto_measured"))


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
        qids = index_artifact.read("fused_entities", columns=["qid"])["qid"].to_list()
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
