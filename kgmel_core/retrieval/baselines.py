"""Zero-shot baselines scored by the same ranking code as the trained retriever.

They keep the trained model honest: if cosine similarity of frozen head-text (or image)
embeddings already ranks as well, the training bought nothing.
"""

from __future__ import annotations

import torch

from kgmel_core.retrieval.features import Features


def zero_shot_text(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """(mention, entity) vectors: frozen embeddings of the head texts."""
    texts = features.banks.texts
    return texts[features.mentions.head], texts[features.entities.head]


def zero_shot_names(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """(mention, entity) vectors: frozen embeddings of the mention surface and the entity label."""
    texts = features.banks.texts
    return texts[features.mentions.name], texts[features.entities.name]


def zero_shot_text_and_names(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views, each unit-normalised, concatenated and scaled by 1/sqrt(2): the inner product is the
    mean of the two cosines. The strongest frozen baseline, and where the residual retriever starts."""
    pairs = zip(zero_shot_text(features), zero_shot_names(features), strict=True)
    return tuple(
        torch.cat([torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)], 1) / 2**0.5
        for a, b in pairs
    )


def zero_shot_image(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """(mention, entity) vectors: frozen image embeddings; a missing image is the zero vector, so
    every entity ties with the gold one and the pessimistic rank is the KB size (a miss)."""
    images = features.banks.images

    def gather(rows: torch.Tensor) -> torch.Tensor:
        return images[rows.clamp_min(0)] * (rows >= 0).unsqueeze(-1)

    return gather(features.mentions.image), gather(features.entities.image)
