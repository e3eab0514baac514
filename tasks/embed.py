"""Stage `embed`: text and image embedding tables (every unique string and image once, cached per encoder)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import EncoderConfig, key_config
from kgmel_core.data.texts import HeadTexts, text_sha
from kgmel_core.factory import (
    EncoderIdentity,
    EncoderSpec,
    create_encoder,
    encode_images_with,
    encode_texts_with,
    encoder_identity,
)
from kgmel_core.retrieval.features import images_to_embed, texts_to_embed
from storage import Artifact, file_sha256
from storage.embedding_cache import EmbeddingCache
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.parallel import map_shards

BOOTSTRAP_NOTE = "tiny open_clip stand-in trained on this dataset (offline demo), not CLIP ViT-B/32"


def _cached_vectors(ctx: PipelineContext, spec: EncoderSpec, identity: str, kind: str, keys: list[str],
                    items: list[str], encode, **options) -> tuple[np.ndarray, int]:
    """Vectors of `items` from the shared cache, encoding only what it lacks (`runner: dask`: `ctx.shards`
    chunks at a time on the workers); and how many were encoded now."""
    return EmbeddingCache(ctx.store, identity, kind).get_or_compute(
        keys, items, functools.partial(encode, spec), desc=f"embed {kind}s",
        map_batches=lambda fn, batches: map_shards(ctx.distributed, fn, [(batch,) for batch in batches]),
        wave=ctx.shards, **options,
    )


def _image_vectors(ctx: PipelineContext, spec: EncoderSpec, identity: EncoderIdentity, images, width: int,
                   stats: dict) -> tuple[list[str], np.ndarray]:
    """(image_sha256, vectors) of every distinct image; none when the encoder reads no images (counted)."""
    if identity.image is None or images.height == 0:
        if images.height:
            logger().warning("encoder %s embeds no images: %d images ignored (counted)", identity.encoder,
                             images.height)
        stats["images_ignored"] = images.height
        if identity.image is not None:  # an empty table still has the image encoder's width
            width = create_encoder(spec).image_dim
        return [], np.zeros((0, width), np.float32)
    shas = images["image_sha256"].to_list()
    vectors, fresh = _cached_vectors(ctx, spec, identity.image, "image", shas, images["image_path"].to_list(),
                                     encode_images_with)
    stats.update(images_unique=images.height, images_encoded_now=fresh)
    return shas, vectors


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
        identity = encoder_identity(spec)  # the model itself is loaded only if a string is not cached
        mentions, entities = ingest.read("mentions"), ingest.read("entities")
        generated = generation.read("mention_triples") if generation is not None else None
        texts = texts_to_embed(mentions, entities, ingest.read("kb_triples"), HeadTexts.of(config.model_dump()),
                               generated)
        shas = [text_sha(t) for t in texts]
        vectors, fresh = _cached_vectors(ctx, spec, identity.text, "text", shas, texts, encode_texts_with,
                                         sizes=[len(text) for text in texts])
        writer.write_table("text_embeddings", *schemas.text_embeddings_table(shas, texts, vectors))
        writer.stats.update(texts_unique=len(texts), texts_encoded_now=fresh,
                            mentions_without_image=int(mentions["image_sha256"].null_count()),
                            entities_without_image=int(entities["image_sha256"].null_count()))
        image_shas, image_vectors = _image_vectors(ctx, spec, identity, images_to_embed(mentions, entities),
                                                   vectors.shape[1], writer.stats)
        writer.write_table("image_embeddings", *schemas.image_embeddings_table(image_shas, image_vectors))
        writer.stats.update(encoder=identity.encoder, precision=stage_config["precision"])
        if uses_bootstrap:
            writer.stats["encoder_note"] = BOOTSTRAP_NOTE
        logger().info("embed: %s", writer.stats)

    return run_stage(ctx, "embed", stage_config, inputs, build, sources=sources)
