"""What the learned reranker reads: each mention's candidate list as a `RerankGroup`, from the tables of
ingest, retrieve, filter and (when it ran) generate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from kgmel_core.config import CrossEncoderConfig
from kgmel_core.rerank.candidates import relation_tail_pairs
from kgmel_core.rerank.cross_encoder import RerankGroup, candidate_input, mention_input


@dataclass
class GroupCounts:
    """Inputs the reranker could not read in full, counted (never silently skipped)."""

    mentions: int = 0
    without_candidates: int = 0  # no candidate list: retrieval's answer (none) stands
    sentences_cut: int = 0  # longer than max_sentence_chars: a window around the mention is kept
    candidates_without_description: int = 0
    candidates_without_facts: int = 0
    gold_not_retrieved: dict[str, int] = field(default_factory=dict)  # per split: gold known but not in the list

    def as_stats(self) -> dict:
        return dict(self.__dict__)


def build_groups(
    mentions: pl.DataFrame,
    candidates: pl.DataFrame,
    entities: pl.DataFrame,
    filtered_triples: pl.DataFrame,
    config: CrossEncoderConfig,
    k: int,
    mention_generations: pl.DataFrame | None = None,
    mention_triples: pl.DataFrame | None = None,
) -> tuple[list[RerankGroup], GroupCounts]:
    """One group per mention that has candidates (`candidates` cut at rank `k`), in the order of
    `mentions`; `gold` is set where the mention's gold entity is among them."""
    served = candidates.filter(pl.col("rank") <= k).sort("mention_id", "rank")
    grouped = served.group_by("mention_id", maintain_order=True).agg("qid", "score")
    lists = {m: (q, s) for m, q, s in grouped.iter_rows()}
    by_qid = {q: (label, text) for q, label, text in entities.select("qid", "label", "description").iter_rows()}
    facts = relation_tail_pairs(filtered_triples, "mention_id", "qid")
    descriptions: Mapping[str, str] = {}
    if mention_generations is not None:
        described = mention_generations.filter(pl.col("description").is_not_null())
        descriptions = dict(described.select("mention_id", "description").iter_rows())
    generated = relation_tail_pairs(mention_triples, "mention_id") if mention_triples is not None else {}
    counts, groups = GroupCounts(mentions=mentions.height), []
    for row in mentions.iter_rows(named=True):
        mid = row["mention_id"]
        if mid not in lists:
            counts.without_candidates += 1
            continue
        qids, scores = lists[mid]
        text = mention_input(row["mention"], row["sentence"], config.max_sentence_chars, descriptions.get(mid),
                             generated.get(mid, [])[: config.max_facts])
        counts.sentences_cut += text.truncated
        candidate_texts = []
        for qid in qids:
            label, description = by_qid.get(qid, (qid, None))
            kept = facts.get((mid, qid), [])[: config.max_facts]
            counts.candidates_without_description += not description
            counts.candidates_without_facts += not kept
            candidate_texts.append(candidate_input(label, description, kept, config.max_description_chars))
        gold = qids.index(row["gold_qid"]) if row.get("gold_qid") in qids else None
        if row.get("gold_qid") and gold is None:
            split = row.get("split") or "none"
            counts.gold_not_retrieved[split] = counts.gold_not_retrieved.get(split, 0) + 1
        groups.append(RerankGroup(mid, text.text, list(qids), candidate_texts, np.asarray(scores, np.float32), gold))
    return groups, counts
