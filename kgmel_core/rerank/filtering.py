"""Triple filtering before reranking: keep the candidates' triples that look like the mention's.

Over the union of all candidates' triples, relations are ranked by their best cosine similarity to
any relation the VLM generated for the mention (top 2n kept) and tails likewise against the
generated tails (top n kept); a triple survives only if both its relation and its tail survive.
The reference code subsampled the embeddings but mapped indices through the unsampled list,
pairing scores with the wrong strings; here every score is looked up by the string itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from kgmel_core import schemas
from kgmel_core.data.texts import text_sha
from kgmel_core.retrieval.features import triple_texts


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
    return cap_per_entity(triples, max_per_entity), applied


def cap_per_entity(triples: Sequence[Triple], k: int) -> list[Triple]:
    """The first `k` triples of each entity, in input order."""
    per_entity: dict[str, int] = defaultdict(int)
    kept = []
    for triple in triples:
        if per_entity[triple.qid] < k:
            per_entity[triple.qid] += 1
            kept.append(triple)
    return kept


class TextVectors(Mapping[str, np.ndarray]):
    """Embedded strings looked up by their text, from `text_embeddings` tables (the first table that
    holds a string wins): the filter compares strings, the embed stage keys them by hash."""

    def __init__(self, tables: Sequence[pl.DataFrame]):
        table = pl.concat(list(tables)).unique("text_sha", keep="first", maintain_order=True)
        self._matrix = schemas.vector_matrix(table["vector"])
        self._row = {sha: i for i, sha in enumerate(table["text_sha"].to_list())}

    def __getitem__(self, text: str) -> np.ndarray:
        return self._matrix[self._row[text_sha(text)]]

    def __iter__(self) -> Iterator[str]:
        raise TypeError("TextVectors is looked up by text, not iterated")

    def __len__(self) -> int:
        return len(self._row)


def rank_by_context(triples: Sequence[Triple], context: np.ndarray, vectors: Mapping[str, np.ndarray],
                    n: int) -> list[Triple]:
    """Each candidate's `n` triples most similar to the mention's context (its sentence, embedded as the
    retriever's head text), best first: a filter that needs no generated triples. A triple's score is
    the cosine of its relation plus that of its tail, so "occupation: actor" wins for a sentence about
    a stage production whichever entity it belongs to."""
    scored: dict[str, list[tuple[float, int, Triple]]] = defaultdict(list)
    for position, triple in enumerate(triples):
        score = float(vectors[triple.relation_text] @ context + vectors[triple.tail_text] @ context)
        scored[triple.qid].append((-score, position, triple))
    return [t for qid in dict.fromkeys(t.qid for t in triples) for _, _, t in sorted(scored[qid])[:n]]


@dataclass
class FilterResult:
    kept: pl.DataFrame  # FILTERED_TRIPLES
    counts: pl.DataFrame  # FILTER_COUNTS
    by_context: int  # mentions whose facts were ranked by their sentence (no generated triples to compare)


def filter_mentions(
    mentions: pl.DataFrame,
    candidates: Mapping[str, Sequence[str]],
    kb_triples: pl.DataFrame,
    mention_triples: pl.DataFrame | None,
    vectors: Mapping[str, np.ndarray],
    context_texts: Sequence[str],
    facts: str,
    n: int,
    max_per_entity: int,
) -> FilterResult:
    """The facts stage 3 shows of each mention's candidates (`facts`):
    - `filtered`: KGMEL's filter against the mention's generated triples; a mention without any is
      ranked by its context instead (counted);
    - `context`: each candidate's `n` triples most similar to the mention's context;
    - `first`: each candidate's first triples, as the KB lists them;
    - `none`: no facts.
    Every mode keeps at most `max_per_entity` per candidate. `context_texts`: the embedded context string
    of each mention (row-aligned with `mentions`)."""
    by_entity: dict[str, list[Triple]] = {}
    for row in triple_texts(kb_triples).iter_rows(named=True):
        by_entity.setdefault(row["head_qid"], []).append(
            Triple(row["head_qid"], row["relation"], row["tail"], row["relation_text"], row["tail_text"])
        )
    if mention_triples is None:
        mention_triples = pl.DataFrame(schema={"mention_id": pl.String, "relation": pl.String, "tail": pl.String})
    generated = triple_texts(mention_triples).group_by("mention_id").agg("relation_text", "tail_text")
    per_mention = {m: (r, t) for m, r, t in generated.iter_rows()}
    kept_rows, counts, by_context = [], [], 0
    for mention_id, context in zip(mentions["mention_id"].to_list(), context_texts, strict=True):
        pool = [t for qid in candidates.get(mention_id, []) for t in by_entity.get(qid, [])]
        before = len(pool)
        relations, tails = per_mention.get(mention_id, ([], []))
        if facts == "none":
            pool = []
        elif facts == "context" or (facts == "filtered" and not relations):
            pool = rank_by_context(pool, vectors[context], vectors, n)
            by_context += facts == "filtered"
        elif facts == "filtered":
            pool, _ = filter_triples(pool, relations, tails, vectors, n, len(pool))
        kept = cap_per_entity(pool, max_per_entity)
        kept_rows += [{"mention_id": mention_id, "qid": t.qid, "relation": t.relation, "tail": t.tail} for t in kept]
        counts.append({"mention_id": mention_id, "triples_before": before, "triples_after": len(kept)})
    return FilterResult(
        pl.DataFrame(kept_rows, schema=pl.Schema(schemas.FILTERED_TRIPLES)),
        pl.DataFrame(counts, schema=pl.Schema(schemas.FILTER_COUNTS)),
        by_context,
    )
