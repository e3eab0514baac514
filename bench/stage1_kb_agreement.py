"""Stage 1's generated triples checked against the KB (KGMEL's core assumption), on a finished `generate`
artifact: per generated (relation, object) pair, does the gold entity have the relation, and a triple with
that relation and object; per mention, does a wrong candidate of the retriever's list match more pairs
than the gold entity. Objects match when their normalised text is equal, or (second row) when their
all-MiniLM-L6-v2 cosine reaches `--cut`. `instance of <type>` is added by the parser from the type line;
the rows without it measure the model's own facts.

    python -m bench.stage1_kb_agreement --artifacts A --generate KEY [--retrieve KEY] [--candidates 16] \\
        [--cut 0.8] [--examples 30]
"""

from __future__ import annotations

import argparse

import polars as pl

from kgmel_core.llm.agreement import Pair, mention_agreement, normalised, same_text, summarise
from kgmel_core.rerank.candidates import candidate_lists
from storage import ArtifactStore


def pairs_by(frame: pl.DataFrame, key: str) -> dict[str, list[Pair]]:
    grouped: dict[str, list[Pair]] = {}
    for owner, relation, tail in frame.select(key, "relation", "tail").iter_rows():
        grouped.setdefault(owner, []).append((relation, tail))
    return grouped


def embedding_rule(strings: set[str], cut: float):
    """`same_object` that also accepts objects whose MiniLM cosine reaches `cut`."""
    from kgmel_core.retrieval.encoders import SentenceTransformerTextEncoder

    ordered = sorted(strings)
    vectors = SentenceTransformerTextEncoder("minilm").encode_texts(ordered)  # unit length: dot = cosine
    row = {text: i for i, text in enumerate(ordered)}

    def same_object(a: str, b: str) -> bool:
        return same_text(a, b) or float(vectors[row[a]] @ vectors[row[b]]) >= cut

    return same_object


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--generate", required=True, help="key of a finished generate artifact")
    parser.add_argument("--retrieve", help="key of a retrieve artifact on the same ingest (wrong-candidate check)")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--cut", type=float, default=0.8, help="MiniLM cosine at which two objects match")
    parser.add_argument("--examples", type=int, default=30)
    args = parser.parse_args()
    store = ArtifactStore(args.artifacts)
    generated = store.require("generate", args.generate)
    ingest = store.input(generated, "ingest")
    asked = generated.read("mention_generations").filter(pl.col("status") == "ok")
    mentions = ingest.read("mentions").join(asked.select("mention_id", "entity_type", "description"), on="mention_id")
    triples = pairs_by(generated.read("mention_triples"), "mention_id")
    facts = pairs_by(ingest.read("kb_triples").rename({"head_qid": "qid"}), "qid")
    labels = dict(ingest.read("entities").select("qid", "label").iter_rows())
    lists = None
    if args.retrieve:
        retrieved = store.require("retrieve", args.retrieve)
        # Another ingest key (a code change re-keys every stage) is fine if it holds the same mentions and golds.
        other = store.input(retrieved, "ingest")
        golds = [a.read("mentions").select("mention_id", "gold_qid").sort("mention_id") for a in (ingest, other)]
        if other.key != ingest.key and not golds[0].equals(golds[1]):
            raise SystemExit(f"retrieve {args.retrieve} read other mentions than generate {args.generate}")
        lists = candidate_lists(retrieved.read("candidates"), args.candidates)

    rows = mentions.sort("mention_id").to_dicts()
    # Only objects under a relation both sides have can ever be compared: embed those.
    strings: set[str] = set()
    for row in rows:
        relations = {normalised(r) for r, _ in triples.get(row["mention_id"], [])}
        strings |= {t for _, t in triples.get(row["mention_id"], [])}
        for qid in {row["gold_qid"], *((lists or {}).get(row["mention_id"], []))}:
            strings |= {t for r, t in facts.get(qid, []) if normalised(r) in relations}
    rules = {"normalised text": same_text, f"text or MiniLM cosine >= {args.cut}": embedding_rule(strings, args.cut)}

    print(f"{len(rows)} mentions answered (split {dict(mentions['split'].value_counts().iter_rows())}); "
          f"candidates: {'top-' + str(args.candidates) if lists else 'not compared'}")
    print("| objects match by | facts | generated pairs | relation shared with gold | pair matches gold | "
          "mentions with a gold match | wrong candidate matches more | gold matches more | mentions compared |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for rule_name, rule in rules.items():
        for facts_name, keep in (("all", lambda r: True), ("without instance of", lambda r: r != "instance of")):
            agreement = [
                mention_agreement(
                    row["mention_id"], [p for p in triples.get(row["mention_id"], []) if keep(p[0])],
                    row["gold_qid"], facts, (lists or {}).get(row["mention_id"]) if lists else None, rule,
                )
                for row in rows
            ]
            s = summarise(agreement)
            print(f"| {rule_name} | {facts_name} | {s['generated_pairs']} | {s['relation_shared']:.3f} | "
                  f"{s['pair_matched']:.3f} | {s['mentions_with_a_gold_match']:.3f} | {s['wrong_beats_gold']:.3f} | "
                  f"{s['gold_beats_wrong']:.3f} | {s['mentions_compared']} |")

    rule = rules[f"text or MiniLM cosine >= {args.cut}"]
    print(f"\n{args.examples} examples (the first by mention id): generated, and the gold entity's facts under the "
          "same relations (* = matched)")
    for row in rows[: args.examples]:
        mine = triples.get(row["mention_id"], [])
        gold = facts.get(row["gold_qid"], [])
        relations = {normalised(r) for r, _ in mine}
        shown = [f"{r}: {t}" for r, t in gold if normalised(r) in relations][:6]
        marked = [
            f"{r}: {t}" + ("*" if any(normalised(r) == normalised(g) and rule(t, gt) for g, gt in gold) else "")
            for r, t in mine
        ]
        print(f"- **{row['mention']}** ({row['mention_id']}, gold {row['gold_qid']} {labels.get(row['gold_qid'])}): "
              f"{row['entity_type']}; {row['description']} | {'; '.join(marked)} || KB: {'; '.join(shown) or '–'}")


if __name__ == "__main__":
    main()
