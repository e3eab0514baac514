"""Reading stage inputs back into what kgmel_core computes on: retriever features and checkpoints."""

from __future__ import annotations

import polars as pl

from kgmel_core.data.texts import HeadTexts
from kgmel_core.retrieval.features import Features, assemble
from kgmel_core.retrieval.model import KGMELRetriever
from storage import Artifact


def load_features(
    ingest: Artifact,
    embed: Artifact,
    generation: Artifact | None,
    heads: HeadTexts,
    max_triples: int,
    only_entities: list[str] | None = None,
) -> Features:
    """The retriever's inputs; `only_entities` keeps just those KB entities (the ones an index appends)."""
    entities, kb_triples = ingest.read("entities"), ingest.read("kb_triples")
    if only_entities is not None:
        keep = pl.Series(only_entities, dtype=pl.String)
        entities = entities.filter(pl.col("qid").is_in(keep))
        kb_triples = kb_triples.filter(pl.col("head_qid").is_in(keep))
    return assemble(
        ingest.read("mentions"),
        entities,
        kb_triples,
        generation.read("mention_triples") if generation is not None else None,
        embed.read("text_embeddings"),
        embed.read("image_embeddings"),
        heads,
        max_triples,
    )


def load_model(train: Artifact) -> KGMELRetriever:
    return KGMELRetriever.load(train.file("retriever.pt"))
