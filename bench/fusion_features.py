"""Would more features help stage 3's fusion? A measurement, not a product feature.

The product fuses two scores per candidate, the retriever's and the cross-encoder's
(`kgmel_core.rerank.fusion`). This bench adds candidate features the two may not carry, as extra columns
of the same conditional logit, fitted out of fold like the product's fusion on a learned `rerank`
artifact's val lists, and reports each set's paired gain over the two-score fusion:
- the train split's **link priors**: p(e | m), how often train links this mention string to the entity,
  and the entity prior, how often it links the entity at all (both as log(1 + count));
- the frozen encoder's **zero-shot cosines**, mention string vs. label and mention text vs. entity text,
  read from the `embed` artifact the retriever was trained on;
- **Wikidata's creation order**, log of the Q-number: old items are the prominent ones, a popularity
  prior that needs no training data (only where every id is a Q-number).

Why the priors are not in the product: fitted freely, they gain mostly through *negative* weights. These
benchmarks draw their splits so that val entities are rarely (RichpediaMEL: never) train entities, so
"linked in train" predicts "wrong in val" – an artifact of how the split was drawn, which a deployed linker
must not learn. With the weights held non-negative (a prior may only vouch for an entity), what remains is
the gain to expect in use. docs/results.md has the numbers for all of them.

    python -m bench.fusion_features --artifacts artifacts --rerank KEY
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
from collections import Counter

import numpy as np
import polars as pl

from kgmel_core.data.texts import HeadTexts, text_sha
from kgmel_core.metrics import paired_gain
from kgmel_core.rerank.fusion import fit_logit, fold_of
from storage import Artifact, ArtifactStore

FEATURES = ("retrieval", "reranker", "mention prior", "entity prior", "name cosine", "text cosine", "QID order")
PRIORS = (2, 3)  # the columns whose weights `fit_nonnegative_priors` holds >= 0
QID = re.compile(r"Q[1-9][0-9]*")  # stricter than the readers' Q\d+: no Q0, whose log is -inf


def mention_key(mention: str) -> str:
    return " ".join(mention.split()).lower()


def qid_order(qid: str) -> float:
    """log of the Q-number; NaN for an id that is not one (the feature is then left out)."""
    return math.log(int(qid[1:])) if QID.fullmatch(qid) else math.nan


def _vectors(embed: Artifact, texts: set[str]) -> dict[str, np.ndarray]:
    """Unit vectors of `texts` from an `embed` artifact's text table, by their text_sha."""
    shas = {text_sha(t): t for t in texts}
    table = embed.read("text_embeddings").filter(pl.col("text_sha").is_in(list(shas)))
    return {shas[s]: np.asarray(v, np.float64) for s, v in table.select("text_sha", "vector").iter_rows()}


def val_lists(store: ArtifactStore, rerank_key: str) -> list[tuple[str, np.ndarray, int | None]]:
    """(mention id, [K, len(FEATURES)] features in retrieval order, gold position) for every reranked val
    mention."""
    rerank = store.require("rerank", rerank_key)
    ingest = store.input(rerank, "ingest")
    embed = store.input(store.input(rerank, "retrieve"), "embed")
    heads = HeadTexts.of(embed.manifest["config"])
    mentions = ingest.read("mentions")
    entities = {q: (label, description) for q, label, description in
                ingest.read("entities").select("qid", "label", "description").iter_rows()}
    train = mentions.filter((pl.col("split") == "train") & pl.col("gold_qid").is_not_null())
    pairs = Counter((mention_key(m), q) for m, q in train.select("mention", "gold_qid").iter_rows())
    linked = Counter(train["gold_qid"].to_list())
    ranked = rerank.read("reranked").filter(pl.col("reranker_score").is_not_null()).sort("mention_id", "retrieval_rank")
    lists = {m: (q, c, r) for m, q, c, r in ranked.group_by("mention_id", maintain_order=True)
             .agg("qid", "reranker_score", "retrieval_score").iter_rows()}
    val = mentions.filter((pl.col("split") == "val") & pl.col("mention_id").is_in(list(lists)))
    entity_text = {q: heads.entity_text(label, description) for q, (label, description) in entities.items()}
    vectors = _vectors(embed, set(val["mention"]) | {heads.mention_text(m, s) for m, s in
                       val.select("mention", "sentence").iter_rows()} | {e[0] for e in entities.values()}
                       | set(entity_text.values()))
    rows = []
    for mid, mention, sentence, gold in val.select("mention_id", "mention", "sentence", "gold_qid").iter_rows():
        qids, reranker, retrieval = lists[mid]
        key, name, text = mention_key(mention), vectors[mention], vectors[heads.mention_text(mention, sentence)]
        x = np.array([[r, c, math.log1p(pairs[(key, q)]), math.log1p(linked[q]), name @ vectors[entities[q][0]],
                       text @ vectors[entity_text[q]], qid_order(q)]
                      for q, c, r in zip(qids, reranker, retrieval, strict=True)])
        rows.append((mid, x, qids.index(gold) if gold in qids else None))
    return rows


def fit(rows, columns: list[int]) -> tuple[np.ndarray, float]:
    """Conditional-logit weights (in feature units) and the penalised loss, over lists with their gold."""
    return fit_logit([x[:, columns] for _, x, _ in rows], [g for _, _, g in rows])


def fit_nonnegative_priors(rows, columns: list[int]) -> tuple[np.ndarray, list[int]]:
    """The best fit whose prior weights are all >= 0: the loss is convex, so the constrained optimum is the
    unconstrained optimum of some subset of the priors; try every subset and keep the best feasible one."""
    free, priors = [c for c in columns if c not in PRIORS], [c for c in columns if c in PRIORS]
    best = None
    for n in range(len(priors) + 1):
        for subset in itertools.combinations(priors, n):
            weights, loss = fit(rows, free + list(subset))
            if (weights[len(free):] >= 0).all() and (best is None or loss < best[1]):
                best = (weights, loss, free + list(subset))
    return best[0], best[2]


def out_of_fold_hits(rows, columns: list[int], nonnegative: bool) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Top-1 hits of each val mention ranked with the weights fitted on the other fold; the all-val weights."""
    def fitted(part):
        if nonnegative:
            return fit_nonnegative_priors(part, columns)
        return fit(part, columns)[0], columns

    by_fold = {f: fitted([r for r in rows if fold_of(r[0]) != f]) for f in (0, 1)}
    hits = []
    for mid, x, gold in rows:
        weights, used = by_fold[fold_of(mid)]
        hits.append(gold is not None and int(np.argmax(x[:, used] @ weights)) == gold)
    weights, used = fitted(rows)
    return np.array(hits, float), weights, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--rerank", required=True, help="key of a learned `rerank` artifact (its val lists)")
    args = parser.parse_args()
    rows = val_lists(ArtifactStore(args.artifacts), args.rerank)
    retrieval = np.array([g == 0 for _, _, g in rows], float)
    base, _, _ = out_of_fold_hits(rows, [0, 1], nonnegative=False)
    print(f"{len(rows)} val mentions; retrieval top-1 {100 * retrieval.mean():.2f}; "
          f"reranker fused (refit here) {100 * base.mean():.2f}")
    gold_seen = [x[g, 3] > 0 for _, x, g in rows if g is not None]
    wrong_seen = [v > 0 for _, x, g in rows for i, v in enumerate(x[:, 3]) if i != g]
    print(f"linked in train: {100 * np.mean(gold_seen):.1f}% of the retrieved val golds, "
          f"{100 * np.mean(wrong_seen):.1f}% of the wrong candidates")
    variants = [([0, 1, 2], "+ mention prior", (False, True)),
                ([0, 1, 2, 3], "+ mention and entity priors", (False, True)),
                ([0, 1, 4, 5], "+ zero-shot cosines (name, text)", (False,))]
    if not any(np.isnan(x[:, 6]).any() for _, x, _ in rows):
        variants.append(([0, 1, 6], "+ QID order", (False,)))
    print("| fusion | HITS@1 | gain over the reranker's fusion (paired 95%) | weights fitted on all of val |")
    print("|---|---:|---:|---|")
    for columns, name, constraints in variants:
        for nonnegative in constraints:
            hits, weights, used = out_of_fold_hits(rows, columns, nonnegative)
            gain, ci = paired_gain(hits, base)
            shown = ", ".join(f"{FEATURES[c]} {w:+.3g}" for c, w in zip(used, weights, strict=True))
            label = name + (", prior weights >= 0" if nonnegative else ", free weights" if set(columns) & set(PRIORS)
                            else "")
            print(f"| {label} | {100 * hits.mean():.2f} | {gain:+.2f} ± {ci:.2f} | {shown} |")


if __name__ == "__main__":
    main()
