"""The out-of-KB evaluation (`kgmel_core.nil`) of finished benchmark variants, without re-running them: the
same function the `evaluate` stage calls, on the lists each variant served (its `rerank` stage's ranked list
where it has one, else its `retrieve` candidates), for several seeds of the withheld entities.

    python -m bench.nil_offline --artifacts ROOT --benchmark KEY [--variant "kgmel + reranker"] [--seeds 0 1 2]
                                [--details]

Reads each variant's artifacts through the benchmark's lineage; nothing is trained or scored again.
`--details`: for each variant, the confusions of the decision and points of the precision-recall curve
(summed and pooled over the seeds).
"""

from __future__ import annotations

import argparse
import statistics

import polars as pl

from kgmel_core.config import NilConfig
from kgmel_core.evaluation import Evaluation, OutOfKB, Reranked, Served, out_of_kb_rows
from kgmel_core.nil import precision_recall_curve, train_golds
from storage import ArtifactStore

SHOWN = ("nil_mentions", "nil_precision", "nil_recall", "nil_f1", "in_kb_hits@1", "in_kb_hits@1_with_nil",
         "accuracy_with_nil")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--benchmark", required=True, help="benchmark artifact key")
    parser.add_argument("--variant", action="append", help="variant label (default: kgmel, kgmel + reranker)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--details", action="store_true", help="confusions and curve points")
    parser.add_argument("--share", type=float, default=NilConfig().share)
    parser.add_argument("--max-cost", type=float, default=NilConfig().max_in_kb_cost,
                        help="the threshold's bound on lost in-KB HITS@1 points (negative: no bound)")
    args = parser.parse_args()
    max_cost = None if args.max_cost is not None and args.max_cost < 0 else args.max_cost
    store = ArtifactStore(args.artifacts)
    bench = store.require("benchmark", args.benchmark)
    print(f"{bench.manifest['stats'].get('dataset')} (benchmark {bench.key}), share {args.share}, max cost {max_cost}, "
          f"seeds {args.seeds}: "
          "mean (min-max) over seeds\n")
    print("| variant | " + " | ".join(SHOWN) + " |")
    print("|---|" + "---:|" * len(SHOWN))
    details = {}
    for label in args.variant or ["kgmel", "kgmel + reranker"]:
        evaluate = store.input(bench, f"evaluate:{label}")
        retrieve, ingest = store.input(evaluate, "retrieve"), store.input(evaluate, "ingest")
        rerank = store.input(evaluate, "rerank") if "rerank" in evaluate.manifest["inputs"] else None
        mentions = ingest.read("mentions")
        train_gold = train_golds(mentions)
        val = mentions.filter(pl.col("split") == "val")
        served = Served(retrieve.read("candidates"), int(retrieve.manifest["stats"]["top_k"]), pl.DataFrame(),
                        pl.DataFrame())
        reranked = None
        if rerank is not None and "reranked" in rerank.tables:
            reranked = Reranked(rerank.read("predictions"), True, rerank.read("reranked"))
        runs, outcomes = [], []
        for seed in args.seeds:
            result = Evaluation(pl.DataFrame())
            rows = out_of_kb_rows("kgmel", val, served, reranked, OutOfKB(ingest.read("entities"), train_gold,
                                                                            args.share, seed, max_cost), result)
            if not rows:
                raise SystemExit(f"{label}: {result.stats['out_of_kb_skipped']}")
            runs.append({r["metric"]: r["value"] for r in rows})
            outcomes.append(result.nil_outcomes)
        details[label] = pl.concat(outcomes)
        cells = []
        for metric in SHOWN:
            values = [run[metric] for run in runs]
            digits = 3 if metric.startswith("nil_") and metric != "nil_mentions" else 2
            cells.append(f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.details:
        for label, outcomes in details.items():
            print_details(label, outcomes)


def print_details(label: str, outcomes: pl.DataFrame) -> None:
    """Where the decision goes wrong: its confusions (every seed's mentions together) and the curve a user
    reads a threshold of their own from."""
    print(f"\n{label}: confusions over {len(set(outcomes['mention_id']))} mentions x seeds")
    counts = outcomes.group_by("is_nil", "top1_correct", "predicted_nil").len().sort("is_nil", "top1_correct",
                                                                                   "predicted_nil")
    for is_nil, correct, predicted, n in counts.iter_rows():
        truth = "NIL" if is_nil else ("in-KB, top-1 right" if correct else "in-KB, top-1 wrong")
        print(f"  {truth:<20} -> {'NIL' if predicted else 'answered':<8} {n}")
    print("  curve (pooled P(NIL) cuts): threshold, NIL precision, NIL recall, in-KB HITS@1 with the decision")
    curve = precision_recall_curve(outcomes, points=400)
    for recall in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        row = curve.filter(pl.col("nil_recall") >= recall).sort("threshold", descending=True).row(0)
        print("   " + ", ".join(f"{v:.3f}" for v in row))

if __name__ == "__main__":
    main()
