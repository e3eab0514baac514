"""Stage `ingest`: dataset files -> `mentions`, `entities`, `kb_triples`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import DatasetConfig
from kgmel_core.data.datasets import DatasetError, DatasetLayout, InputLimits, read_dataset, read_mentions
from storage import Artifact, file_sha256
from storage.store import canonical_json, folder_fingerprint
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage


@task(name="ingest", **STAGE_TASK)
def ingest(ctx: PipelineContext, config: DatasetConfig, kb: Artifact | None = None) -> Artifact:
    """The dataset's mentions, and its KB from its `kb/` files or, given a `kb` artifact (built from a
    Wikidata dump), from that."""
    layout = DatasetLayout.of(config)
    sources = {str(path.relative_to(layout.root)): file_sha256(path) for path in layout.input_files()}
    sources["mention_images"] = folder_fingerprint(layout.root / layout.mention_image_dir)
    sources["kb_images"] = folder_fingerprint(layout.root / layout.kb_image_dir)

    def build(writer):
        tables = (kb.read("entities"), kb.read("kb_triples")) if kb is not None else None
        dataset = read_dataset(layout, config.bad_records, tables, InputLimits.of(config))
        writer.write_table("mentions", dataset.mentions, schemas.MENTIONS)
        writer.write_table("rejected", dataset.rejected, schemas.REJECTED)
        writer.write_table("entities", dataset.entities, schemas.ENTITIES)
        writer.write_table("kb_triples", dataset.kb_triples, schemas.KB_TRIPLES)
        writer.stats.update(dataset.stats)
        logger().info("ingest %s: %s", config.name, dataset.stats)

    # The resolved path is part of the key because the tables hold absolute image paths.
    config_key = {**config.model_dump(), "path": str(layout.root)}
    return run_stage(ctx, "ingest", config_key, {"kb": kb}, build, sources=sources)


@task(name="ingest_link_mentions", **STAGE_TASK)
def ingest_link_mentions(
    ctx: PipelineContext,
    limits: InputLimits,
    mentions_file: str | None = None,
    records: list[dict] | None = None,
    image_dir: str | None = None,
) -> Artifact:
    """New mentions to link (a MIMIC JSON file or the records themselves); gold answers optional.

    The artifact holds empty `entities`/`kb_triples` tables, so the embed and retrieve stages read
    it like any ingest artifact and embed only the mention side.
    """
    if (mentions_file is None) == (records is None):
        raise ValueError("give exactly one of mentions_file or records")
    folder = Path(image_dir).resolve() if image_dir else None
    images = folder_fingerprint(folder) if folder else "no images"
    if mentions_file is not None:
        path = Path(mentions_file).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"mentions file {path} not found")
        sources = {"mentions": file_sha256(path), "images": images}
    else:
        path = None
        sources = {"records": hashlib.sha256(canonical_json(records).encode()).hexdigest(), "images": images}

    def build(writer):
        mentions, stats = read_mentions(path, None, folder, records=records, require_gold=False, limits=limits)
        if mentions.height == 0:  # an empty artifact would only fail later, in embed, with Arrow's words
            raise DatasetError(f"{path or 'records'}: no mentions to link ({stats['sentences']} sentence records)")
        writer.write_table("mentions", mentions, schemas.MENTIONS)
        writer.write_table("entities", pl.DataFrame(schema=pl.Schema(schemas.ENTITIES)), schemas.ENTITIES)
        writer.write_table("kb_triples", pl.DataFrame(schema=pl.Schema(schemas.KB_TRIPLES)), schemas.KB_TRIPLES)
        writer.stats.update(stats, image_dir=str(folder) if folder else None)

    # max_mentions refuses or changes nothing, so it stays out of the key like the ingest stage's runtime settings
    config = {"image_dir": str(folder) if folder else None, "max_sentence_chars": limits.max_sentence_chars,
              "max_image_pixels": limits.max_image_pixels}
    return run_stage(ctx, "ingest_link", config, {}, build, sources=sources)
