"""Reading stage inputs back into what kgmel_core computes on: retriever features and checkpoints."""

from __future__ import annotations

from kgmel_core.data.texts import HeadTexts
from kgmel_core.retrieval.features import Features, assemble
from kgmel_core.retrieval.model import KGMELRetriever
from storage import Artifact


def load_features(
    ingest: Artifact, embed: Artifact, generation: Artifact | None, heads: HeadTexts, max_triples: int
) -> Features:
    return assemble(
        ingest.read("mentions"),
        ingest.read("entities"),
        ingest.read("kb_triples"),
        generation.read("mention_triples") if generation is not None else None,
        embed.read("text_embeddings"),
        embed.read("image_embeddings"),
        heads,
        max_triples,
    )


def load_model(train: Artifact) -> KGMELRetriever:
    return KGMELRetriever.load(train.file("retriever.pt"))
