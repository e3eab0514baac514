"""Triple filtering before reranking: keep the candidates' triples that look like the mention's.

Over the union of all candidates' triples, relations are ranked by their best cosine similarity to
any relation the VLM generated for the mention (top 2n kept) and tails likewise against the
generated tails (top n kept); a triple survives only if both its relation and its tail survive.
The reference code subsampled the embeddings but mapped indices through the unsampled list,
pairing scores with the wrong strings; here every score is looked up by the string itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Triple:
    qid: str
    relation: str  # what the prompt shows
    tail: str
    relation_text: str  # what was embedded (may carry a description)
    tail_text: str


def _top(strings: Sequence[str], queries: Sequence[str], vectors: Mapping[str, np.ndarray], keep: int) -> set[str]:
    """The `keep` strings most similar (max cosine over queries) to any query; ties broken by text."""
    unique = sorted(set(strings))
    if len(unique) <= keep:
        return set(unique)
    q = np.stack([vectors[x] for x in queries])
    s = np.stack([vectors[x] for x in unique])
    best = (s @ q.T).max(axis=1)
    order = sorted(range(len(unique)), key=lambda i: (-best[i], unique[i]))
    return {unique[i] for i in order[:keep]}


def filter_triples(
    triples: Sequence[Triple],
    mention_relations: Sequence[str],
    mention_tails: Sequence[str],
    vectors: Mapping[str, np.ndarray],
    n: int,
    max_per_entity: int,
) -> tuple[list[Triple], bool]:
    """(kept triples in input order, capped per entity; whether filtering applied).

    Without generated triples there is nothing to compare against: the first `max_per_entity`
    triples of each candidate are kept and the second value is False, so the stage can count it.
    """
    applied = bool(mention_relations) and bool(mention_tails)
    if applied:
        relations = _top([t.relation_text for t in triples], mention_relations, vectors, 2 * n)
        tails = _top([t.tail_text for t in triples], mention_tails, vectors, n)
        triples = [t for t in triples if t.relation_text in relations and t.tail_text in tails]
    per_entity: dict[str, int] = defaultdict(int)
    kept = []
    for triple in triples:
        if per_entity[triple.qid] < max_per_entity:
            per_entity[triple.qid] += 1
            kept.append(triple)
    return kept, applied
