"""Stage `clip_bootstrap`: a tiny open_clip stand-in trained on the dataset (offline demos and tests only)."""

from __future__ import annotations

import polars as pl
from prefect import task

from kgmel_core.data.texts import HeadTexts
from kgmel_core.retrieval.features import entity_heads
from kgmel_core.retrieval.tiny_clip import TINY_CLIP_MODEL, train_tiny_clip
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, run_stage


@task(name="clip_bootstrap", **STAGE_TASK)
def clip_bootstrap(ctx: PipelineContext, ingest: Artifact, epochs: int, seed: int) -> Artifact:
    """Train the tiny stand-in CLIP on the KB's (text, image) pairs and the train mentions' pairs."""

    def build(writer):
        entities = ingest.read("entities").filter(pl.col("image_path").is_not_null())
        triples = ingest.read("kb_triples")
        facts = triples.group_by("head_qid", maintain_order=True).agg(
            pl.concat_str(pl.col("relation"), pl.lit(" "), pl.col("tail")).str.join("; ").alias("facts")
        )
        entities = entities.join(facts, left_on="qid", right_on="head_qid", how="left")
        texts = [
            f"{h}. {f}" if f else h
            for h, f in zip(entity_heads(entities, HeadTexts()), entities["facts"].fill_null("").to_list(), strict=True)
        ]
        images = entities["image_path"].to_list()
        mentions = ingest.read("mentions").filter((pl.col("split") == "train") & pl.col("image_path").is_not_null())
        texts += mentions["sentence"].to_list()
        images += mentions["image_path"].to_list()
        stats = train_tiny_clip(texts, images, writer.file_path("tiny_clip.pt"), epochs=epochs, seed=seed)
        writer.stats.update(stats)
        writer.stats["note"] = "tiny open_clip stand-in trained on this dataset, not a pretrained CLIP"

    config = {"epochs": epochs, "seed": seed, "model": TINY_CLIP_MODEL}
    return run_stage(ctx, "clip_bootstrap", config, {"ingest": ingest}, build)
