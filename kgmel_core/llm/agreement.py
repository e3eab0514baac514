"""How far stage 1's generated triples agree with the KB: KGMEL's core assumption, measured.

The method filters a candidate's KB triples by the relations and objects the mention's generated triples
share with them, which only helps when the generated triples resemble the *right* entity's KB facts more
than a wrong candidate's. Three numbers per mention answer that: the share of generated relations the
gold entity has, the share of generated (relation, object) pairs that match one of its triples, and
whether a wrong candidate matches more pairs than the gold entity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Pair = tuple[str, str]  # (relation, object); the head is the mention or the entity
SameObject = Callable[[str, str], bool]


def normalised(text: str) -> str:
    """Lower case, punctuation to spaces, spaces collapsed: "U.S.A." and "u s a" compare equal."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def same_text(a: str, b: str) -> bool:
    return normalised(a) == normalised(b)


def matched_pairs(generated: Sequence[Pair], facts: Sequence[Pair], same_object: SameObject = same_text) -> int:
    """Generated pairs with a fact of the same relation (normalised) whose object `same_object` accepts."""
    by_relation: dict[str, list[str]] = {}
    for relation, tail in facts:
        by_relation.setdefault(normalised(relation), []).append(tail)
    return sum(
        any(same_object(tail, known) for known in by_relation.get(normalised(relation), ()))
        for relation, tail in generated
    )


def shared_relations(generated: Sequence[Pair], facts: Sequence[Pair]) -> int:
    """Generated pairs whose relation the entity has at all (whatever the object)."""
    relations = {normalised(relation) for relation, _ in facts}
    return sum(normalised(relation) in relations for relation, _ in generated)


@dataclass(frozen=True)
class MentionAgreement:
    mention_id: str
    generated: int  # generated pairs
    relation_shared: int  # of them, with a relation the gold entity has
    pair_matched: int  # of them, matching one of the gold entity's triples
    best_wrong_matched: int | None  # most pairs any wrong candidate matches (None: no candidate list with gold)

    @property
    def wrong_beats_gold(self) -> bool | None:
        return None if self.best_wrong_matched is None else self.best_wrong_matched > self.pair_matched


def mention_agreement(
    mention_id: str,
    generated: Sequence[Pair],
    gold: str,
    facts: Mapping[str, Sequence[Pair]],
    candidates: Sequence[str] | None,
    same_object: SameObject = same_text,
) -> MentionAgreement:
    """`facts`: KB (relation, object) pairs per QID; `candidates`: the retriever's list, compared only when the
    gold entity is in it (the filter never sees the gold entity otherwise)."""
    gold_facts = facts.get(gold, ())
    matched = matched_pairs(generated, gold_facts, same_object)
    best_wrong = None
    if candidates is not None and gold in candidates:
        best_wrong = max(
            (matched_pairs(generated, facts.get(qid, ()), same_object) for qid in candidates if qid != gold), default=0
        )
    return MentionAgreement(
        mention_id, len(generated), shared_relations(generated, gold_facts), matched, best_wrong
    )


def summarise(rows: Sequence[MentionAgreement]) -> dict[str, float | int]:
    """Shares over all generated pairs (relation, pair), and over mentions (a wrong candidate matching more)."""
    pairs = sum(r.generated for r in rows)
    compared = [r for r in rows if r.best_wrong_matched is not None]
    nan = float("nan")
    return {
        "mentions": len(rows),
        "generated_pairs": pairs,
        "relation_shared": sum(r.relation_shared for r in rows) / pairs if pairs else nan,
        "pair_matched": sum(r.pair_matched for r in rows) / pairs if pairs else nan,
        "mentions_with_a_gold_match": sum(r.pair_matched > 0 for r in rows) / len(rows) if rows else nan,
        "mentions_compared": len(compared),
        "wrong_beats_gold": sum(bool(r.wrong_beats_gold) for r in compared) / len(compared) if compared else nan,
        "gold_beats_wrong": sum(r.best_wrong_matched < r.pair_matched for r in compared) / len(compared)
        if compared else nan,
    }
