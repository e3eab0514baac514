"""The KGMEL retriever: triple representations, dual-query sparse attention, gated fusion.

Mentions and entities go through the same network (head text + image + triples -> one vector),
so both land in one space that FAISS can search with inner products.

Faults of the reference code fixed here: padded triples are masked out of the attention (the
reference never masks them), a row with no triples attends to nothing instead of producing NaN,
and a missing image contributes neither a query nor a fused term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kgmel_core.config import RetrieverConfig


@dataclass
class SideBatch:
    """One side (mentions or entities) of a batch, already gathered from the embedding banks."""

    head: Tensor  # [B, d_text]
    image: Tensor  # [B, d_image]; zeros where missing
    image_mask: Tensor  # [B] bool: has an image
    relation: Tensor  # [B, T, d_text]
    tail: Tensor  # [B, T, d_text]
    triple_mask: Tensor  # [B, T] bool: real (not padding) triple


class TripleEncoder(nn.Module):
    """x_rt = tail + MLP([tail; relation]): the tail, shifted by what the relation says about it."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.LeakyReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, relation: Tensor, tail: Tensor) -> Tensor:
        return tail + self.mlp(torch.cat([tail, relation], dim=-1))


def sparse_top_p_softmax(scores: Tensor, mask: Tensor, p: int) -> Tensor:
    """Softmax over the p highest-scoring real triples of each row; every other weight is exactly 0.

    Rows without any real triple get all-zero weights (not NaN), so an entity with no triples
    simply contributes no triple vector.
    """
    neg_inf = torch.finfo(scores.dtype).min
    scores = scores.masked_fill(~mask, neg_inf)
    k = min(p, scores.shape[-1])
    top = scores.topk(k, dim=-1).indices
    keep = torch.zeros_like(mask).scatter(-1, top, True) & mask
    weights = torch.softmax(scores.masked_fill(~keep, neg_inf), dim=-1)
    weights = weights * keep
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)


class TripleAttention(nn.Module):
    """Two queries (image, head text) attend over the triples; scores mix as beta*img + (1-beta)*head."""

    def __init__(self, dim: int, beta: float, temperature: float, top_p: int):
        super().__init__()
        self.q_image = nn.Linear(dim, dim, bias=False)
        self.q_head = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.beta, self.temperature, self.top_p = beta, temperature, top_p

    def scores(self, head: Tensor, image: Tensor, image_mask: Tensor, triples: Tensor) -> Tensor:
        keys = self.k(triples)  # [B, T, d]
        scale = math.sqrt(keys.shape[-1])
        s_head = torch.einsum("bd,btd->bt", self.q_head(head), keys) / scale
        s_image = torch.einsum("bd,btd->bt", self.q_image(image), keys) / scale
        # Without an image, the head query alone decides (beta falls to 0 for that row).
        beta = self.beta * image_mask.to(keys.dtype).unsqueeze(-1)
        return (beta * s_image + (1 - beta) * s_head) / self.temperature

    def forward(self, head: Tensor, image: Tensor, image_mask: Tensor, triples: Tensor, triple_mask: Tensor) -> Tensor:
        weights = sparse_top_p_softmax(self.scores(head, image, image_mask, triples), triple_mask, self.top_p)
        return self.out(torch.einsum("bt,btd->bd", weights, self.v(triples)))


class GatedFusion(nn.Module):
    """z = W_t x_triple + (W_h x_head) * sigmoid(G_h x_head) + (W_i x_img) * sigmoid(G_i x_img)."""

    def __init__(self, dim: int, use_gate: bool = True):
        super().__init__()
        self.w_triple = nn.Linear(dim, dim)
        self.w_head, self.g_head = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.w_image, self.g_image = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.use_gate = use_gate

    def gate(self, layer: nn.Linear, x: Tensor) -> Tensor:
        return torch.sigmoid(layer(x)) if self.use_gate else torch.ones_like(x)

    def forward(self, head: Tensor, image: Tensor | None, image_mask: Tensor | None, triple: Tensor | None) -> Tensor:
        z = self.w_head(head) * self.gate(self.g_head, head)
        if image is not None:
            z = z + self.w_image(image) * self.gate(self.g_image, image) * image_mask.to(z.dtype).unsqueeze(-1)
        if triple is not None:
            z = z + self.w_triple(triple)
        return z


class KGMELRetriever(nn.Module):
    """Projects each modality to `hidden_dim`, then triple attention + gated fusion, L2-normalised."""

    def __init__(self, text_dim: int, image_dim: int | None, config: RetrieverConfig):
        super().__init__()
        h = config.hidden_dim
        self.config = config
        self.use_image = config.use_image and image_dim is not None
        self.proj_head = nn.Linear(text_dim, h)
        self.proj_relation = nn.Linear(text_dim, h)
        self.proj_tail = nn.Linear(text_dim, h)
        self.proj_image = nn.Linear(image_dim or text_dim, h)
        self.triples = TripleEncoder(h, config.dropout)
        self.attention = TripleAttention(h, config.beta, config.attn_temperature, config.top_p)
        self.fusion = GatedFusion(h, use_gate=config.use_gate)

    def forward(self, batch: SideBatch) -> Tensor:
        head = self.proj_head(batch.head)
        image_mask = batch.image_mask & self.use_image
        image = self.proj_image(batch.image) * image_mask.to(head.dtype).unsqueeze(-1)
        triple = None
        if self.config.use_triples and batch.relation.shape[1] > 0:
            x_rt = self.triples(self.proj_relation(batch.relation), self.proj_tail(batch.tail))
            triple = self.attention(head, image, image_mask, x_rt, batch.triple_mask)
        z = self.fusion(head, image if self.use_image else None, image_mask, triple)
        return nn.functional.normalize(z, dim=-1)
