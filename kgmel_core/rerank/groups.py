"""What a ranking reranker (learned or hosted) reads: each mention's candidate list as a `RerankGroup`,
from the tables of ingest, retrieve, filter and (when it ran) generate; and how its scores become the
stage's ranked lists and predictions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from kgmel_core.config import CrossEncoderConfig, RerankConfig
from kgmel_core.data.scope import in_scope
from kgmel_core.rerank.candidates import candidate_lists, relation_tail_pairs
from kgmel_core.rerank.cross_encoder import RerankGroup, candidate_input, mention_input
from kgmel_core.rerank.fusion import Fusion
from kgmel_core.rerank.gate import is_sent, retrieval_margins
from kgmel_core.rerank.learned import predictions_from_ranking, ranked_table


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


@dataclass(frozen=True)
class Stage3Tables:
    """The tables stage 3 reads: mentions (ingest), the served candidates (retrieve), the KB's entities,
    the filtered facts (filter) and, when stage 1 ran, its generations and triples."""

    mentions: pl.DataFrame
    candidates: pl.DataFrame
    entities: pl.DataFrame
    filtered_triples: pl.DataFrame
    mention_generations: pl.DataFrame | None = None
    mention_triples: pl.DataFrame | None = None

    def groups(self, config: RerankConfig, mentions: pl.DataFrame | None = None
               ) -> tuple[list[RerankGroup], GroupCounts]:
        """The reranker's view of `mentions` (default: all): their candidate lists with the texts it reads."""
        return build_groups(
            self.mentions if mentions is None else mentions, self.candidates, self.entities, self.filtered_triples,
            config.cross_encoder, config.candidates, self.mention_generations, self.mention_triples,
        )

    def split(self, config: RerankConfig, split: str) -> tuple[list[RerankGroup], GroupCounts]:
        return self.groups(config, self.mentions.filter(pl.col("split") == split))


@dataclass
class Stage3Mentions:
    """What a ranking rerank stage works on: the mentions, those in scope, the served candidates and
    margins, the mentions the gate sends, and the in-scope mentions' groups."""

    mentions: pl.DataFrame
    scoped: pl.DataFrame
    candidates: pl.DataFrame
    margins: dict[str, float]
    sent: set[str]
    groups: list[RerankGroup]
    counts: GroupCounts
    k: int
    margin_threshold: float | None

    @classmethod
    def of(cls, tables: Stage3Tables, config: RerankConfig) -> Stage3Mentions:
        scoped = in_scope(tables.mentions, config.scope)
        margins = dict(retrieval_margins(tables.candidates).iter_rows())
        sent = {m for m in scoped["mention_id"].to_list() if is_sent(margins.get(m, math.inf), config.margin_threshold)}
        groups, counts = tables.groups(config, scoped)
        return cls(tables.mentions, scoped, tables.candidates, margins, sent, groups, counts, config.candidates,
                   config.margin_threshold)

    def sent_groups(self) -> list[RerankGroup]:
        return [g for g in self.groups if g.mention_id in self.sent]

    def rank(self, scores: Sequence[np.ndarray | None], fusions: Sequence[Fusion],
             failed: Mapping[str, str] | None = None, source_name: str = "reranker"
             ) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
        """(RERANKED, PREDICTIONS, outcome counts) from each group's scores (None: not sent) and fusion."""
        ranked = ranked_table(self.groups, scores, fusions)
        predictions, outcomes = predictions_from_ranking(
            self.mentions["mention_id"].to_list(), set(self.scoped["mention_id"].to_list()), self.sent, ranked,
            candidate_lists(self.candidates, self.k), self.margins, failed, source_name,
        )
        return ranked, predictions, outcomes

    def stats(self) -> dict:
        return {"mentions": self.mentions.height, "in_scope": self.scoped.height, "sent": len(self.sent),
                "margin_threshold": self.margin_threshold, "inputs": self.counts.as_stats()}
