"""Turn tables + embedding banks into index tensors the retriever can batch over.

Every unique string and image is embedded once; a side (mentions or entities) only holds integer
indices into those banks, so a 100k-entity KB with millions of repeated relation/tail strings
stays small in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from kgmel_core.data.texts import HeadTexts, text_sha, with_description
from kgmel_core.retrieval.model import SideBatch
from kgmel_core.schemas import vector_matrix


@dataclass
class Banks:
    """Embedding matrices and the sha -> row maps into them."""

    texts: Tensor  # [n_texts, d_text]
    text_index: dict[str, int]
    images: Tensor  # [n_images, d_image] (a zero row 0 when there are none)
    image_index: dict[str, int]

    @classmethod
    def from_tables(cls, text_embeddings: pl.DataFrame, image_embeddings: pl.DataFrame | None) -> Banks:
        texts = torch.from_numpy(vector_matrix(text_embeddings["vector"]))
        if image_embeddings is not None and image_embeddings.height:
            images = torch.from_numpy(vector_matrix(image_embeddings["vector"]))
            image_index = {sha: i for i, sha in enumerate(image_embeddings["image_sha256"].to_list())}
        else:  # no images: one zero row of the table's declared width (or the text width)
            dtype = image_embeddings.schema["vector"] if image_embeddings is not None else None
            width = dtype.size if isinstance(dtype, pl.Array) else texts.shape[1]
            images, image_index = torch.zeros((1, width)), {}
        return cls(texts, {sha: i for i, sha in enumerate(text_embeddings["text_sha"].to_list())}, images, image_index)

    @property
    def text_dim(self) -> int:
        return int(self.texts.shape[1])

    @property
    def image_dim(self) -> int | None:
        return int(self.images.shape[1]) if self.image_index else None

    def text_rows(self, texts: list[str], what: str) -> np.ndarray:
        try:
            return np.array([self.text_index[text_sha(t)] for t in texts], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"{what}: a text has no embedding (was the embed stage run on these inputs?)") from exc


@dataclass
class SideFeatures:
    """Index tensors for one side; `batch(rows, banks)` gathers the vectors for the model."""

    ids: list[str]
    head: Tensor  # [N] rows into banks.texts
    name: Tensor  # [N] rows into banks.texts: the mention's surface string / the entity's label
    image: Tensor  # [N] rows into banks.images, -1 = no image
    pairs: Tensor  # [P, 2] distinct (relation, tail) pairs of this side, as rows into banks.texts
    pair: Tensor  # [N, T] each slot's row in `pairs`, left-aligned
    triple_mask: Tensor  # [N, T] bool

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: Tensor, banks: Banks, device: str | torch.device = "cpu") -> SideBatch:
        """The batch's rows, with each distinct triple pair gathered once and the slots cut to the
        longest triple list in the batch."""
        image_rows = self.image[rows]
        has_image = image_rows >= 0
        image = banks.images[image_rows.clamp_min(0)] * has_image.unsqueeze(-1)
        mask = self.triple_mask[rows]
        width = int(mask.sum(1).max()) if mask.numel() else 0
        mask = mask[:, :width]
        slots = self.pair[rows][:, :width]
        used, inverse = torch.unique(slots[mask], return_inverse=True)
        triple_pair = torch.zeros_like(slots)
        triple_pair[mask] = inverse
        return SideBatch(
            head=banks.texts[self.head[rows]].to(device),
            name=banks.texts[self.name[rows]].to(device),
            image=image.to(device),
            image_mask=has_image.to(device),
            pair_relation=banks.texts[self.pairs[used, 0]].to(device),
            pair_tail=banks.texts[self.pairs[used, 1]].to(device),
            triple_pair=triple_pair.to(device),
            triple_mask=mask.to(device),
        )


def relation_text(row: dict) -> str:
    return with_description(row["relation"], row.get("relation_description"))


def tail_text(row: dict) -> str:
    return with_description(row["tail"], row.get("tail_description"))


def triple_texts(triples: pl.DataFrame) -> pl.DataFrame:
    """Add `relation_text` / `tail_text` columns (descriptions where the table has them)."""
    rel_desc = pl.col("relation_description") if "relation_description" in triples.columns else pl.lit(None)
    tail_desc = pl.col("tail_description") if "tail_description" in triples.columns else pl.lit(None)

    def joined(name: str, desc: pl.Expr) -> pl.Expr:
        return (
            pl.when(desc.is_not_null() & (desc != ""))
            .then(pl.concat_str(pl.col(name), pl.lit(": "), desc))
            .otherwise(pl.col(name))
        )

    return triples.with_columns(relation_text=joined("relation", rel_desc), tail_text=joined("tail", tail_desc))


def build_side(
    ids: list[str],
    heads: list[str],
    names: list[str],
    image_shas: list[str | None],
    triples: pl.DataFrame,
    id_column: str,
    banks: Banks,
    max_triples: int,
) -> SideFeatures:
    """Index tensors for a side; `triples` has `id_column`, `relation_text`, `tail_text` (first
    `max_triples` per id are kept, in table order)."""
    n = len(ids)
    position = {id_: i for i, id_ in enumerate(ids)}
    kept = (
        triples.filter(pl.col(id_column).is_in(ids))
        .with_columns(slot=pl.int_range(pl.len()).over(id_column))
        .filter(pl.col("slot") < max_triples)
    )
    width = int(kept["slot"].max() + 1) if kept.height else 0
    pair = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    pairs = torch.zeros((0, 2), dtype=torch.long)
    if kept.height:
        rows = torch.tensor([position[x] for x in kept[id_column].to_list()])
        slots = torch.from_numpy(kept["slot"].to_numpy().astype(np.int64))
        relation = torch.from_numpy(banks.text_rows(kept["relation_text"].to_list(), "relation"))
        tail = torch.from_numpy(banks.text_rows(kept["tail_text"].to_list(), "tail"))
        pairs, inverse = torch.unique(torch.stack([relation, tail], dim=1), dim=0, return_inverse=True)
        pair[rows, slots] = inverse
        mask[rows, slots] = True
    image = torch.tensor([banks.image_index.get(s, -1) if s else -1 for s in image_shas], dtype=torch.long)
    head = torch.from_numpy(banks.text_rows(heads, "head"))
    name = torch.from_numpy(banks.text_rows(names, "name"))
    return SideFeatures(list(ids), head, name, image, pairs, pair, mask)


def name_texts(mentions: pl.DataFrame, entities: pl.DataFrame) -> list[str]:
    """The name view of both sides: mention surface strings and entity labels (embedded alone, they
    match surnames and aliases that a whole sentence or description drowns)."""
    return mentions["mention"].to_list() + entities["label"].to_list()


def mention_heads(mentions: pl.DataFrame, heads: HeadTexts) -> list[str]:
    return [heads.mention_text(m, s) for m, s in zip(mentions["mention"], mentions["sentence"], strict=True)]


def entity_heads(entities: pl.DataFrame, heads: HeadTexts) -> list[str]:
    return [heads.entity_text(lbl, d) for lbl, d in zip(entities["label"], entities["description"], strict=True)]


def texts_to_embed(
    mentions: pl.DataFrame,
    entities: pl.DataFrame,
    kb_triples: pl.DataFrame,
    heads: HeadTexts,
    mention_triples: pl.DataFrame | None = None,
) -> list[str]:
    """Every distinct string the retriever reads, in first-seen order: head texts, names, and the
    relation and tail texts of KB (and generated) triples."""
    kb = triple_texts(kb_triples)
    texts = mention_heads(mentions, heads) + entity_heads(entities, heads) + name_texts(mentions, entities)
    texts += kb["relation_text"].to_list() + kb["tail_text"].to_list()
    if mention_triples is not None:
        generated = triple_texts(mention_triples)
        texts += generated["relation_text"].to_list() + generated["tail_text"].to_list()
    return list(dict.fromkeys(texts))


@dataclass
class Features:
    banks: Banks
    mentions: SideFeatures
    entities: SideFeatures
    mention_split: list[str]
    mention_gold_rows: Tensor  # row of the gold entity in `entities`, -1 when it is not in the KB


def images_to_embed(mentions: pl.DataFrame, entities: pl.DataFrame) -> pl.DataFrame:
    """(image_sha256, image_path) of every distinct image, mentions' first: one vector per content, however
    many records name it."""
    rows = pl.concat([mentions.select("image_sha256", "image_path"), entities.select("image_sha256", "image_path")])
    return rows.drop_nulls().unique("image_sha256", maintain_order=True)


def assemble(
    mentions: pl.DataFrame,
    entities: pl.DataFrame,
    kb_triples: pl.DataFrame,
    mention_triples: pl.DataFrame | None,
    text_embeddings: pl.DataFrame,
    image_embeddings: pl.DataFrame | None,
    heads: HeadTexts,
    max_triples: int,
) -> Features:
    """Everything the retriever needs, from the ingest/generate/embed tables."""
    banks = Banks.from_tables(text_embeddings, image_embeddings)
    kb = triple_texts(kb_triples)
    entity_side = build_side(
        entities["qid"].to_list(),
        entity_heads(entities, heads),
        entities["label"].to_list(),
        entities["image_sha256"].to_list(),
        kb,
        "head_qid",
        banks,
        max_triples,
    )
    if mention_triples is None:
        mention_triples = pl.DataFrame(schema={"mention_id": pl.String, "relation": pl.String, "tail": pl.String})
    mention_side = build_side(
        mentions["mention_id"].to_list(),
        mention_heads(mentions, heads),
        mentions["mention"].to_list(),
        mentions["image_sha256"].to_list(),
        triple_texts(mention_triples),
        "mention_id",
        banks,
        max_triples,
    )
    row_of = {qid: i for i, qid in enumerate(entity_side.ids)}
    gold = torch.tensor([row_of.get(q, -1) if q else -1 for q in mentions["gold_qid"].to_list()], dtype=torch.long)
    return Features(banks, mention_side, entity_side, mentions["split"].to_list(), gold)


def subset_side(side: SideFeatures, rows: Tensor) -> SideFeatures:
    return SideFeatures(
        [side.ids[i] for i in rows.tolist()],
        side.head[rows],
        side.name[rows],
        side.image[rows],
        side.pairs,
        side.pair[rows],
        side.triple_mask[rows],
    )
