"""Stage 1's triples against the KB: the matching rules, checked against hand counts."""

import math

from kgmel_core.llm.agreement import (
    MentionAgreement,
    matched_pairs,
    mention_agreement,
    normalised,
    shared_relations,
    summarise,
)

GENERATED = [("occupation", "politician"), ("Country of citizenship", "India"), ("position held", "Prime Minister")]
FACTS = {
    "Q1": [
        ("occupation", "Politician."), ("country of citizenship", "India"), ("position held", "Prime Minister of India")
    ],
    "Q2": [("occupation", "politician"), ("country of citizenship", "India"), ("position held", "Prime Minister")],
    "Q3": [("sport", "cricket")],
}


def test_normalised_text_ignores_case_punctuation_and_spacing():
    assert normalised("  U.S.A. ") == "u s a" == normalised("u s a")
    assert normalised("Prime-Minister") == "prime minister"


def test_pairs_match_on_relation_and_object_and_relations_alone_are_counted_apart():
    # Q1: occupation (politician = "Politician.") and citizenship match; "Prime Minister" != "... of India"
    assert matched_pairs(GENERATED, FACTS["Q1"]) == 2
    assert shared_relations(GENERATED, FACTS["Q1"]) == 3
    assert matched_pairs(GENERATED, FACTS["Q3"]) == 0 and shared_relations(GENERATED, FACTS["Q3"]) == 0
    # a looser object rule (containment) also takes the position
    assert matched_pairs(GENERATED, FACTS["Q1"], lambda a, b: normalised(a) in normalised(b)) == 3


def test_a_wrong_candidate_that_matches_more_pairs_than_gold_is_counted_only_when_gold_is_in_the_list():
    row = mention_agreement("m", GENERATED, "Q1", FACTS, ["Q3", "Q1", "Q2"])
    assert row == MentionAgreement("m", 3, 3, 2, 3) and row.wrong_beats_gold is True
    absent = mention_agreement("m", GENERATED, "Q1", FACTS, ["Q2", "Q3"])
    assert absent.best_wrong_matched is None and absent.wrong_beats_gold is None


def test_summary_shares_are_over_generated_pairs_and_over_compared_mentions():
    rows = [MentionAgreement("a", 3, 3, 2, 3), MentionAgreement("b", 1, 0, 0, 0), MentionAgreement("c", 2, 1, 1, None)]
    summary = summarise(rows)
    assert summary["generated_pairs"] == 6
    assert math.isclose(summary["relation_shared"], 4 / 6) and math.isclose(summary["pair_matched"], 3 / 6)
    assert math.isclose(summary["mentions_with_a_gold_match"], 2 / 3)
    assert summary["mentions_compared"] == 2
    assert summary["wrong_beats_gold"] == 0.5 and summary["gold_beats_wrong"] == 0.0
