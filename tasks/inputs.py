"""Reading stage inputs back into what kgmel_core computes on: retriever features and checkpoints."""

from __future__ import annotations

import torch

from kgmel_core.config import RetrieverConfig
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
    """The trained retriever; the checkpoint holds tensors and plain values only (`weights_only`)."""
    checkpoint = torch.load(train.file("retriever.pt"), map_location="cpu", weights_only=True)
    model = KGMELRetriever(
        checkpoint["text_dim"], checkpoint["image_dim"], RetrieverConfig.model_validate(checkpoint["retriever_config"])
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
