"""Cost of the learned reranker on this machine: ms per reranked mention (K candidates each) and training
throughput, on the real candidate lists a finished `train_reranker` artifact was trained on.

    python -m bench.reranker_cost --artifacts artifacts [--reranker KEY] [--mentions 300] [--steps 40]
                                  [--batch-pairs 64 128 256] [--score-precisions fp32 bf16] [--cpu-lanes 1 2]
                                  [--repeats 3]

Scoring: the trained model ranks `--mentions` val mentions, each with its K candidates, batched across
mentions as the `rerank` stage does, and one mention at a time (what `kgmel link` of one sentence
pays); `--batch-pairs` compares scoring batch sizes and `--score-precisions` the trained model under
fp32 and bf16 autocast side by side, and `--cpu-lanes` one batch at a time against two in flight, each
the median of `--repeats` runs in turn. Training (`--steps 0`
skips it): `--steps` steps of a fresh model at each batch size and precision, in pairs/s and the minutes
a full training of the artifact's size would take.
Run it with nothing else running.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import typing

import torch

from kgmel_core.config import CrossEncoderConfig, RerankConfig
from kgmel_core.factory import create_cross_encoder
from kgmel_core.retrieval import device
from storage import ArtifactStore
from tasks.reranker import stage3_tables

# `model_copy(update=...)` skips pydantic's validation: an unknown name would silently run in fp32
PRECISIONS = typing.get_args(CrossEncoderConfig.model_fields["precision"].annotation)


def _reranker(store: ArtifactStore, key: str | None):
    keys = store.keys("train_reranker")
    if key is None:
        if len(keys) != 1:
            raise SystemExit(f"{len(keys)} train_reranker artifacts under {store.url}: name one with --reranker")
        key = keys[0]
    return store.require("train_reranker", key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--reranker", default=None, help="train_reranker key (default: the only one)")
    parser.add_argument("--mentions", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-pairs", type=int, nargs="+", default=None,
                        help="scoring batch sizes to compare (default: the artifact's batch_pairs)")
    parser.add_argument("--score-precisions", nargs="+", default=None, choices=PRECISIONS,
                        help="precisions to score in, side by side (default: the artifact's)")
    parser.add_argument("--cpu-lanes", type=int, nargs="+", default=None,
                        help="batches in flight on a CPU to compare, e.g. 1 2 (default: device.CPU_LANES)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32"], choices=PRECISIONS)
    args = parser.parse_args()
    store = ArtifactStore(args.artifacts)
    trained = _reranker(store, args.reranker)
    ce = CrossEncoderConfig.model_validate(trained.manifest["config"]["cross_encoder"])
    config = RerankConfig(candidates=trained.manifest["config"]["candidates"], cross_encoder=ce)
    ingest, retrieve, filtered = (store.input(trained, name) for name in ("ingest", "retrieve", "filter"))
    tables = stage3_tables(ingest, retrieve, filtered, None)
    (val, _), (train, _) = tables.split(config, "val"), tables.split(config, "train")
    val = random.Random(0).sample(val, min(args.mentions, len(val)))
    k = statistics.median(len(g.qids) for g in val)
    print(f"{trained.id}: {len(val)} val mentions, K = {k:.0f}, max_length {ce.max_length}, "
          f"{torch.get_num_threads()} torch threads\n")
    print("| scoring | precision | CPU lanes | ms / mention |")
    print("|---|---|---:|---:|")
    precisions = args.score_precisions or [ce.precision]
    models = {p: create_cross_encoder(ce.model_copy(update={"precision": p}), trained=trained.folder("reranker"))
              for p in precisions}
    for model in models.values():
        model.score(val[:8], ce.batch_pairs)  # warm-up
    sizes, default_lanes = args.batch_pairs or [ce.batch_pairs], device.CPU_LANES
    lanes = args.cpu_lanes or [default_lanes]
    timings: dict[tuple[str, int, int], list[float]] = {
        (p, size, n): [] for p in precisions for size in sizes for n in lanes}
    for _ in range(args.repeats):  # variants in turn, so a noisy moment does not land on one of them only
        for (precision, size, n), runs in timings.items():
            device.CPU_LANES = n
            started = time.perf_counter()
            models[precision].score(val, size)
            runs.append(1000 * (time.perf_counter() - started) / len(val))
    device.CPU_LANES = default_lanes
    for (precision, size, n), runs in timings.items():
        listed = ", ".join(f"{t:.1f}" for t in runs)
        print(f"| batched ({size} pairs) | {models[precision].precision} | {n} | "
              f"{statistics.median(runs):.1f} ({listed}) |")
    model = models[precisions[0]]
    started = time.perf_counter()
    for group in val[:100]:
        model.score([group], ce.batch_pairs)
    alone = 1000 * (time.perf_counter() - started) / min(100, len(val))
    print(f"| one mention at a time | {model.precision} | {device.CPU_LANES} | {alone:.1f} |")
    if args.steps == 0:
        return
    usable = [g for g in train if g.gold is not None and len(g.qids) > 1]
    sample = random.Random(0).sample(usable, min(len(usable), max(args.batches) * args.steps))
    full = min(ce.train_mentions, len(usable)) * ce.epochs
    print("\n| training | batch (mentions) | precision | pairs / s | minutes for the artifact's training |")
    print("|---|---:|---|---:|---:|")
    for precision in args.precisions:
        for batch in args.batches:
            fresh = create_cross_encoder(ce.model_copy(update={"precision": precision}))
            optimizer = fresh.optimizer(ce.lr)
            pairs, elapsed = 0, 0.0
            for step in range(args.steps):
                groups = sample[step * batch : (step + 1) * batch]
                started = time.perf_counter()
                fresh.train_step(optimizer, groups, ce.negatives)
                if step >= 2:  # the first steps warm oneDNN's kernels up
                    elapsed += time.perf_counter() - started
                    pairs += sum(min(len(g.qids), ce.negatives + 1) for g in groups)
            rate = pairs / elapsed
            minutes = full * (ce.negatives + 1) / rate / 60
            print(f"| {batch} mentions | {batch} | {fresh.precision} | {rate:.1f} | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    main()
