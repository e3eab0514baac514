"""Stage `embed`: text and image embedding tables (every unique string and image once, cached per encoder)."""

from __future__ import annotations

import functools
from pathlib import Path

import polars as pl
import pyarrow as pa
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import EncoderConfig, key_config
from kgmel_core.data.texts import HeadTexts, text_sha
from kgmel_core.factory import EncoderSpec, create_encoder, encode_images_with, encode_texts_with
from kgmel_core.retrieval.features import texts_to_embed
from storage import Artifact, file_sha256
from storage.embedding_cache import EmbeddingCache
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.parallel import map_shards


@task(name="embed", **STAGE_TASK)
def embed(
    ctx: PipelineContext,
    config: EncoderConfig,
    ingest: Artifact,
    generation: Artifact | None = None,
    bootstrap: Artifact | None = None,
) -> Artifact:
    """Embed every unique head text, relation, tail and image once (cached per encoder)."""
    uses_bootstrap = config.bootstraps_clip
    spec = EncoderSpec.of(config, bootstrap.file("tiny_clip.pt") if uses_bootstrap and bootstrap else None)
    inputs = {"ingest": ingest, "generation": generation, "clip_bootstrap": bootstrap if uses_bootstrap else None}
    sources = {}
    if not uses_bootstrap and Path(config.clip_pretrained).is_file():
        sources["clip_weights"] = file_sha256(Path(config.clip_pretrained))
    stage_config = key_config(config)
    # `auto` means different vectors on different machines: the key holds what it resolved to here.
    stage_config["precision"] = spec.precision

    def build(writer):
        log = logger()
        encoder = create_encoder(spec)

        def on_workers(fn, batches):  # `runner: dask`: `ctx.shards` chunks at a time on the workers
            return map_shards(ctx.distributed, fn, [(batch,) for batch in batches])
        mentions, entities = ingest.read("mentions"), ingest.read("entities")
        unique = texts_to_embed(
            mentions,
            entities,
            ingest.read("kb_triples"),
            HeadTexts.of(config.model_dump()),
            generation.read("mention_triples") if generation is not None else None,
        )
        shas = [text_sha(t) for t in unique]
        cache = EmbeddingCache(ctx.store, encoder.text.identity, "text")
        vectors, fresh = cache.get_or_compute(
            shas,
            unique,
            functools.partial(encode_texts_with, spec),
            desc="embed texts",
            sizes=[len(text) for text in unique],
            map_batches=on_workers,
            wave=ctx.shards,
        )
        writer.write_table(
            "text_embeddings",
            pa.table({"text_sha": shas, "text": unique, "vector": schemas.vector_column(vectors)}),
            schemas.text_embeddings(vectors.shape[1]),
        )
        writer.stats.update(texts_unique=len(unique), texts_encoded_now=fresh)

        image_rows = pl.concat(
            [mentions.select("image_sha256", "image_path"), entities.select("image_sha256", "image_path")]
        )
        images = image_rows.drop_nulls().unique("image_sha256", maintain_order=True)
        writer.stats.update(
            mentions_without_image=int(mentions["image_sha256"].null_count()),
            entities_without_image=int(entities["image_sha256"].null_count()),
        )
        if encoder.image_dim is None or images.height == 0:
            if images.height:
                log.warning("encoder %s embeds no images: %d images ignored (counted)", encoder.identity, images.height)
            writer.stats["images_ignored"] = images.height
            dim = encoder.image_dim or vectors.shape[1]
            writer.write_table(
                "image_embeddings",
                pa.table(
                    {"image_sha256": pa.array([], pa.string()), "vector": pa.array([], pa.list_(pa.float32(), dim))}
                ),
                schemas.image_embeddings(dim),
            )
        else:
            paths = images["image_path"].to_list()
            image_cache = EmbeddingCache(ctx.store, encoder.image.identity, "image")
            image_vectors, fresh_images = image_cache.get_or_compute(
                images["image_sha256"].to_list(),
                paths,
                functools.partial(encode_images_with, spec),
                desc="embed images",
                map_batches=on_workers,
                wave=ctx.shards,
            )
            writer.write_table(
                "image_embeddings",
                pa.table(
                    {"image_sha256": images["image_sha256"].to_list(), "vector": schemas.vector_column(image_vectors)}
                ),
                schemas.image_embeddings(image_vectors.shape[1]),
            )
            writer.stats.update(images_unique=images.height, images_encoded_now=fresh_images)
        writer.stats.update(encoder=encoder.identity, precision=stage_config["precision"])
        if uses_bootstrap:
            writer.stats["encoder_note"] = (
                "tiny open_clip stand-in trained on this dataset (offline demo), not CLIP ViT-B/32"
            )
        log.info("embed: %s", writer.stats)

    return run_stage(ctx, "embed", stage_config, inputs, build, sources=sources)
