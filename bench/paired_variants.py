"""Two stage-3 variants of one benchmark, compared on the same val mentions: HITS@1 of each and the paired
gain of A over B with its 95% interval (what "does X help the reranker?" needs: two variants each
compared with the retriever alone do not say whether they differ from each other).

    python -m bench.paired_variants --artifacts ROOT --benchmark KEY \
        --a "kgmel + reranker" --b "kgmel + reranker w/o KB facts" [--split val]

Reads the predictions of each variant's `rerank` artifact through the benchmark's lineage (the
benchmark names each variant's `evaluate`, which names its `rerank`); nothing is recomputed.
"""

from __future__ import annotations

import argparse

import numpy as np
import polars as pl

from kgmel_core.metrics import paired_gain
from storage import ArtifactStore


def _predictions(store: ArtifactStore, benchmark, label: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    evaluate = store.input(benchmark, f"evaluate:{label}")
    rerank = store.input(evaluate, "rerank")
    return rerank.read("predictions"), store.input(rerank, "ingest").read("mentions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--benchmark", required=True, help="benchmark artifact key")
    parser.add_argument("--a", required=True, help="variant label (a reranker variant of that benchmark)")
    parser.add_argument("--b", required=True)
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    store = ArtifactStore(args.artifacts)
    benchmark = store.require("benchmark", args.benchmark)
    (a, mentions), (b, _) = _predictions(store, benchmark, args.a), _predictions(store, benchmark, args.b)
    gold = mentions.filter(pl.col("split") == args.split).select("mention_id", "gold_qid")
    both = (gold.join(a.select("mention_id", a_qid="qid"), on="mention_id")
                .join(b.select("mention_id", b_qid="qid"), on="mention_id"))
    hits_a = (both["a_qid"] == both["gold_qid"]).fill_null(False).to_numpy()
    hits_b = (both["b_qid"] == both["gold_qid"]).fill_null(False).to_numpy()
    gain, ci = paired_gain(hits_a, hits_b)
    print(f"| {args.split}, n = {len(both)} | HITS@1 | \n|---|---:|")
    print(f"| A: {args.a} | {100 * np.mean(hits_a):.2f} |\n| B: {args.b} | {100 * np.mean(hits_b):.2f} |")
    print(f"| A − B, paired 95% interval | {gain:+.2f} ± {ci:.2f} |")
    print(f"\nmentions A alone gets right: {int((hits_a & ~hits_b).sum())}, B alone: {int((~hits_a & hits_b).sum())}")


if __name__ == "__main__":
    main()
