"""Would the train split's link prior help stage 3? A measurement, not a product feature.

The mention-entity prior p(e | m) – how often the train split links this mention string to the entity – is
a classic entity-linking feature, and neither the retriever nor the cross-encoder sees it. This bench adds
it, and the entity prior (how often the entity is linked at all), as features of the fusion on a learned
`rerank` artifact's val lists, fitted out of fold like the product's fusion (`kgmel_core.rerank.fusion`).

Why it is not in the product: fitted freely, the priors gain mostly through *negative* weights. These
benchmarks draw their splits so that val entities are rarely (RichpediaMEL: never) train entities, so
"linked in train" predicts "wrong in val" – an artifact of how the split was drawn, which a deployed linker
must not learn. With the weights held non-negative (a prior may only vouch for an entity), what remains is
the gain to expect in use; docs/results.md has the numbers.

    python -m bench.link_prior --artifacts artifacts --rerank KEY
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections import Counter

import numpy as np
import polars as pl

from kgmel_core.metrics import paired_gain
from kgmel_core.rerank.fusion import fit_logit, fold_of
from storage import ArtifactStore

FEATURES = ("retrieval", "reranker", "mention prior", "entity prior")


def mention_key(mention: str) -> str:
    return " ".join(mention.split()).lower()


def val_lists(store: ArtifactStore, rerank_key: str) -> list[tuple[str, np.ndarray, int | None]]:
    """(mention id, [K, 4] features in retrieval order, gold position) for every reranked val mention."""
    rerank = store.require("rerank", rerank_key)
    mentions = store.input(rerank, "ingest").read("mentions")
    train = mentions.filter((pl.col("split") == "train") & pl.col("gold_qid").is_not_null())
    pairs = Counter((mention_key(m), q) for m, q in train.select("mention", "gold_qid").iter_rows())
    entities = Counter(train["gold_qid"].to_list())
    ranked = rerank.read("reranked").filter(pl.col("reranker_score").is_not_null()).sort("mention_id", "retrieval_rank")
    lists = {m: (q, c, r) for m, q, c, r in ranked.group_by("mention_id", maintain_order=True)
             .agg("qid", "reranker_score", "retrieval_score").iter_rows()}
    rows = []
    for mid, mention, gold in mentions.filter(pl.col("split") == "val").select(
            "mention_id", "mention", "gold_qid").iter_rows():
        if mid not in lists:
            continue
        qids, reranker, retrieval = lists[mid]
        key = mention_key(mention)
        x = np.array([[r, c, math.log1p(pairs[(key, q)]), math.log1p(entities[q])]
                      for q, c, r in zip(qids, reranker, retrieval, strict=True)])
        rows.append((mid, x, qids.index(gold) if gold in qids else None))
    return rows


def fit(rows, columns: list[int]) -> tuple[np.ndarray, float]:
    """Conditional-logit weights (in feature units) and the penalised loss, over lists with their gold."""
    return fit_logit([x[:, columns] for _, x, _ in rows], [g for _, _, g in rows])


def fit_nonnegative_priors(rows, columns: list[int]) -> tuple[np.ndarray, list[int]]:
    """The best fit whose prior weights are all >= 0: the loss is convex, so the constrained optimum is the
    unconstrained optimum of some subset of the priors; try every subset and keep the best feasible one."""
    scores, priors = [c for c in columns if c < 2], [c for c in columns if c >= 2]
    best = None
    for n in range(len(priors) + 1):
        for subset in itertools.combinations(priors, n):
            weights, loss = fit(rows, scores + list(subset))
            if (weights[len(scores):] >= 0).all() and (best is None or loss < best[1]):
                best = (weights, loss, scores + list(subset))
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
    print("| fusion | HITS@1 | gain over the reranker's fusion (paired 95%) | weights fitted on all of val |")
    print("|---|---:|---:|---|")
    for columns, name in (([0, 1, 2], "+ mention prior"), ([0, 1, 2, 3], "+ mention and entity priors")):
        for nonnegative in (False, True):
            hits, weights, used = out_of_fold_hits(rows, columns, nonnegative)
            gain, ci = paired_gain(hits, base)
            shown = ", ".join(f"{FEATURES[c]} {w:+.3g}" for c, w in zip(used, weights, strict=True))
            label = f"{name}, {'weights >= 0' if nonnegative else 'free weights'}"
            print(f"| {label} | {100 * hits.mean():.2f} | {gain:+.2f} ± {ci:.2f} | {shown} |")


if __name__ == "__main__":
    main()
