"""Stage `ingest`: dataset files -> `mentions`, `entities`, `kb_triples`."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from kgmel_core import schemas
from kgmel_core.config import DatasetConfig
from kgmel_core.datasets import DatasetLayout, read_dataset
from storage import Artifact, file_sha256
from storage.store import folder_fingerprint
from tasks.common import PipelineContext, logger, run_stage

VERSION = "1"


def layout_for(config: DatasetConfig) -> DatasetLayout:
    return DatasetLayout(
        root=Path(config.path).resolve(),
        mentions_file=config.mentions_file,
        mention_image_dir=config.mention_image_dir,
        kb_entities_file=config.kb_entities_file,
        kb_image_dir=config.kb_image_dir,
        kb_triples_file=config.kb_triples_file,
        property_labels_file=config.property_labels_file,
    )


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(ctx: PipelineContext, config: DatasetConfig) -> Artifact:
    layout = layout_for(config)
    inputs = {str(path.relative_to(layout.root)): file_sha256(path) for path in layout.input_files()}
    inputs["mention_images"] = folder_fingerprint(layout.root / layout.mention_image_dir)
    inputs["kb_images"] = folder_fingerprint(layout.root / layout.kb_image_dir)

    def build(writer):
        dataset = read_dataset(layout)
        writer.write_table("mentions", dataset.mentions, schemas.MENTIONS)
        writer.write_table("entities", dataset.entities, schemas.ENTITIES)
        writer.write_table("kb_triples", dataset.kb_triples, schemas.KB_TRIPLES)
        writer.stats.update(dataset.stats)
        logger().info("ingest %s: %s", config.name, dataset.stats)

    # The resolved path is part of the key because the tables hold absolute image paths.
    return run_stage(ctx, "ingest", VERSION, {**config.model_dump(), "path": str(layout.root)}, inputs, build)
