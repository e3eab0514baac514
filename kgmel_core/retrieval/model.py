"""The KGMEL retriever: triple representations, dual-query sparse attention, gated fusion.

Mentions and entities go through the same network (head text + image + triples -> one vector),
so both land in one space that FAISS can search with inner products.

Triples are packed: a batch carries each distinct (relation, tail) pair once (`pair_relation`,
`pair_tail`) and every row points at its pairs (`triple_pair`). The triple encoder, keys and values
depend only on the pair, so they are computed once per pair, not once per padded slot; only the
attention scores are per (row, slot), far less work than padding every entity to the longest triple
list when triple counts vary.

The name view (`use_name`, beyond the paper): the mention's surface string and the entity's label,
embedded alone, fill a second half of the output vector, so a score is the fused (head, image,
triples) similarity plus a name similarity. A sentence or a description embedded whole drowns the
name ("Meeker in a stage production of Picnic" vs "Ralph Meeker: Sex: male. Birth: 1920, ...").

`init="residual"` (the default) starts the network at the frozen encoder's own answer: the head and
name projections are the identity, the gates are constant, and the triple and image branches enter
through zero-initialised output layers, so before training the vector is the normalised head text
(and name) and retrieval equals the zero-shot cosine; training adds what triples and images
contribute instead of first re-learning what the encoder already knew. `init="paper"` is the
reference's random start.

Faults of the reference code fixed here: padded triples are masked out of the attention (the
reference never masks them), a row with no triples attends to nothing instead of producing NaN,
and a missing image contributes neither a query nor a fused term.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kgmel_core.config import RetrieverConfig


@dataclass
class SideBatch:
    """One side (mentions or entities) of a batch, already gathered from the embedding banks."""

    head: Tensor  # [B, d_text]
    name: Tensor  # [B, d_text]: mention surface / entity label
    image: Tensor  # [B, d_image]; zeros where missing
    image_mask: Tensor  # [B] bool: has an image
    pair_relation: Tensor  # [U, d_text]: the relation of each distinct (relation, tail) pair of the batch
    pair_tail: Tensor  # [U, d_text]
    triple_pair: Tensor  # [B, T] long: each slot's pair (any valid index where masked)
    triple_mask: Tensor  # [B, T] bool: real (not padding) triple

    @classmethod
    def dense(
        cls, head, image, image_mask, relation: Tensor, tail: Tensor, triple_mask: Tensor, name: Tensor | None = None
    ) -> SideBatch:
        """From per-slot tensors [B, T, d] (every slot its own pair): tests and small callers."""
        b, t = triple_mask.shape
        return cls(
            head,
            head if name is None else name,
            image,
            image_mask,
            relation.reshape(b * t, -1),
            tail.reshape(b * t, -1),
            torch.arange(b * t, device=triple_mask.device).reshape(b, t),
            triple_mask,
        )


class TripleEncoder(nn.Module):
    """x_rt = tail + MLP([tail; relation]): the tail, shifted by what the relation says about it."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.LeakyReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, relation: Tensor, tail: Tensor) -> Tensor:
        return tail + self.mlp(torch.cat([tail, relation], dim=-1))


def sparse_top_p_softmax(scores: Tensor, mask: Tensor, p: int, renormalize: bool = True) -> Tensor:
    """Softmax weights of the p highest-scoring real triples of each row; every other weight is 0.

    `renormalize=True`: a softmax over those p (weights sum to 1). `False`: the reference's
    behaviour, a softmax over all real triples whose non-top-p weights are zeroed without
    renormalising (the kept weights sum to less than 1 when a row has more than p triples).
    Rows without any real triple get all-zero weights (not NaN).
    """
    neg_inf = torch.finfo(scores.dtype).min
    scores = scores.masked_fill(~mask, neg_inf)
    k = min(p, scores.shape[-1])
    top = scores.topk(k, dim=-1).indices
    keep = torch.zeros_like(mask).scatter(-1, top, True) & mask
    return torch.softmax(scores.masked_fill(~(keep if renormalize else mask), neg_inf), dim=-1) * keep


class TripleAttention(nn.Module):
    """Two queries (image, head text) attend over the triples; scores mix as beta*img + (1-beta)*head."""

    def __init__(self, dim: int, beta: float, temperature: float, top_p: int, renormalize: bool = True):
        super().__init__()
        self.q_image = nn.Linear(dim, dim, bias=False)
        self.q_head = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.beta, self.temperature, self.top_p, self.renormalize = beta, temperature, top_p, renormalize

    def scores(
        self, head: Tensor, image: Tensor, image_mask: Tensor, keys: Tensor, triple_pair: Tensor,
        triple_mask: Tensor | None = None,
    ) -> Tensor:
        """[B, T] scores of each row's slots (`keys` per pair [U, d]; masked slots score 0).

        One dot product per real (row, slot), not a [B, U] product of every row with every pair of
        the batch, whose cost grows with rows x pairs while the real slots grow with rows alone
        (bench.train_speed measures it)."""
        if triple_mask is None:
            triple_mask = torch.ones_like(triple_pair, dtype=torch.bool)
        rows, slots = triple_mask.nonzero(as_tuple=True)
        slot_keys = keys[triple_pair[rows, slots]]
        score = (self.q_head(head)[rows] * slot_keys).sum(-1)
        if bool(image_mask.any()):  # without an image, the head query alone decides (beta falls to 0)
            beta = self.beta * image_mask[rows].to(keys.dtype)
            score = (1 - beta) * score + beta * (self.q_image(image)[rows] * slot_keys).sum(-1)
        score = score / (math.sqrt(keys.shape[-1]) * self.temperature)
        return torch.zeros(triple_pair.shape, dtype=score.dtype, device=score.device).index_put((rows, slots), score)

    def forward(
        self, head: Tensor, image: Tensor, image_mask: Tensor, pairs: Tensor, triple_pair: Tensor, triple_mask: Tensor
    ) -> Tensor:
        scores = self.scores(head, image, image_mask, self.k(pairs), triple_pair, triple_mask)
        weights = sparse_top_p_softmax(scores, triple_mask, self.top_p, self.renormalize)
        # the weighted sum over each row's kept slots only (at most p per row), again per slot
        rows, slots = (weights > 0).nonzero(as_tuple=True)
        picked = weights[rows, slots].unsqueeze(-1) * self.v(pairs)[triple_pair[rows, slots]]
        summed = torch.zeros(head.shape[0], pairs.shape[-1], dtype=picked.dtype, device=picked.device)
        return self.out(summed.index_add(0, rows, picked))


class GatedFusion(nn.Module):
    """z = W_t x_triple + (W_h x_head) * sigmoid(G_h x_head) + (W_i x_img) * sigmoid(G_i x_img);
    the name view, when used, is gated the same way, (W_n x_name) * sigmoid(G_n x_name)."""

    def __init__(self, dim: int, use_gate: bool = True):
        super().__init__()
        self.w_triple = nn.Linear(dim, dim)
        self.w_head, self.g_head = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.w_image, self.g_image = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.w_name, self.g_name = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.use_gate = use_gate

    def gate(self, layer: nn.Linear, x: Tensor) -> Tensor:
        return torch.sigmoid(layer(x)) if self.use_gate else torch.ones_like(x)

    def name(self, name: Tensor) -> Tensor:
        return self.w_name(name) * self.gate(self.g_name, name)

    def forward(self, head: Tensor, image: Tensor | None, image_mask: Tensor | None, triple: Tensor | None) -> Tensor:
        z = self.w_head(head) * self.gate(self.g_head, head)
        if image is not None:
            z = z + self.w_image(image) * self.gate(self.g_image, image) * image_mask.to(z.dtype).unsqueeze(-1)
        if triple is not None:
            z = z + self.w_triple(triple)
        return z


class KGMELRetriever(nn.Module):
    """Projects each modality to `hidden_dim` (default: the text width), then triple attention + gated
    fusion, L2-normalised."""

    def __init__(self, text_dim: int, image_dim: int | None, config: RetrieverConfig):
        super().__init__()
        self.text_dim, self.image_dim = text_dim, image_dim
        h = self.hidden_dim = config.hidden_dim or text_dim
        self.config = config
        self.use_image = config.use_image and image_dim is not None
        self.proj_head = nn.Linear(text_dim, h)
        self.proj_name = nn.Linear(text_dim, h)
        self.proj_relation = nn.Linear(text_dim, h)
        self.proj_tail = nn.Linear(text_dim, h)
        self.proj_image = nn.Linear(image_dim or text_dim, h)
        self.triples = TripleEncoder(h, config.dropout)
        self.attention = TripleAttention(
            h, config.beta, config.attn_temperature, config.top_p, config.top_p_renormalize
        )
        self.fusion = GatedFusion(h, use_gate=config.use_gate)
        if config.init == "residual":
            self._start_at_the_frozen_encoder()

    @torch.no_grad()
    def _start_at_the_frozen_encoder(self) -> None:
        """Head path = identity (zero-padded when dimensions differ), constant gates, and zero output
        layers on the triple and image branches: the untrained model is the zero-shot text cosine.
        Queries and keys start as the identity too, so the attention first weighs each triple by its
        similarity to the head text (and image), a prior that training refines."""
        identities = (self.proj_head, self.proj_name, self.proj_relation, self.proj_tail, self.fusion.w_head,
                      self.fusion.w_name, self.attention.q_head, self.attention.q_image, self.attention.k)
        for layer in identities:  # the attention starts by picking the triples most like the head text
            layer.weight.copy_(torch.eye(*layer.weight.shape))
            if layer.bias is not None:
                layer.bias.zero_()
        for gate in (self.fusion.g_head, self.fusion.g_name, self.fusion.g_image):
            gate.weight.zero_()
            gate.bias.zero_()
        for branch in (self.fusion.w_triple, self.fusion.w_image):
            branch.weight.zero_()
            branch.bias.zero_()

    def forward(self, batch: SideBatch) -> Tensor:
        head = self.proj_head(batch.head)
        image_mask = batch.image_mask & self.use_image
        if bool(image_mask.any()):
            image = self.proj_image(batch.image) * image_mask.to(head.dtype).unsqueeze(-1)
        else:  # no row has an image: skip a projection whose output would be all zeros
            image = torch.zeros_like(head)
        triple = None
        if self.config.use_triples and batch.triple_mask.shape[1] > 0 and batch.pair_tail.shape[0] > 0:
            pairs = self.triples(self.proj_relation(batch.pair_relation), self.proj_tail(batch.pair_tail))
            triple = self.attention(head, image, image_mask, pairs, batch.triple_pair, batch.triple_mask)
        z = self.fusion(head, image if self.use_image else None, image_mask, triple)
        if self.config.use_name:  # its own half of the vector: the score adds a name similarity
            z = torch.cat([z, self.fusion.name(self.proj_name(batch.name))], dim=-1)
        return nn.functional.normalize(z, dim=-1)

    @property
    def output_dim(self) -> int:
        return self.hidden_dim * (2 if self.config.use_name else 1)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Weights, input widths and the retriever settings: everything `load` needs, as tensors and plain
        values only, so loading never unpickles code."""
        torch.save(
            {"state_dict": self.state_dict(), "text_dim": self.text_dim, "image_dim": self.image_dim,
             "retriever_config": self.config.model_dump()},
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KGMELRetriever:
        """A saved retriever, in eval mode on the CPU (`weights_only`: a checkpoint cannot run code)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        config = RetrieverConfig.model_validate(checkpoint["retriever_config"])
        model = cls(checkpoint["text_dim"], checkpoint["image_dim"], config)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups as nanoGPT's `configure_optimizers` makes them: weight decay on the
    weight matrices of linear maps only, never on biases or gates (decaying a gate's bias pulls it
    toward 0.5 regardless of the data)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_gate = ".g_" in name
        (decay if parameter.dim() >= 2 and not is_gate else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
