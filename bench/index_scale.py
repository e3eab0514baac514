"""Index at scale: recall@16 against exact search and ms/mention, on real fused embeddings and on a
synthetic KB generated on the fly (memory and build time of an IVF-PQ built from shards).

    # real: the fused entities of an `index` artifact, the val mentions of a `retrieve` artifact
    python -m bench.index_scale real --artifacts artifacts --retrieve KEY
    # synthetic: 10M entities of width 768 (never all in memory), 200 queries
    python -m bench.index_scale synthetic --entities 10000000 --dim 768 --nlist 4096

Run on an idle machine. Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import polars as pl

from kgmel_core import schemas
from kgmel_core.config import IndexConfig
from kgmel_core.retrieval.index import build_index_from_shards, search
from storage import ArtifactStore

K = 16


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k that the approximate top-k holds (per query, averaged)."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def timed_search(index, queries: np.ndarray) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    _, ids = search(index, queries, K)
    return ids, 1000 * (time.perf_counter() - started) / len(queries)


def real(args: argparse.Namespace) -> None:
    store = ArtifactStore(args.artifacts)
    retrieve = store.require("retrieve", args.retrieve)
    indexed = store.input(retrieve, "index")
    entities = schemas.vector_matrix(indexed.read("fused_entities")["vector"])
    mentions = retrieve.read("fused_mentions").filter(pl.col("split") == "val")
    queries = schemas.vector_matrix(mentions["vector"])
    n, d = entities.shape
    step = 1 << 15

    def shards():
        return (entities[i : i + step] for i in range(0, n, step))

    flat, _ = build_index_from_shards(shards, n, d, IndexConfig(kind="flat"))
    exact, flat_ms = timed_search(flat, queries)
    print(f"{n} real fused entities (d={d}, index {indexed.key}), {len(queries)} val mentions, top-{K}\n")
    print("| index | nlist | nprobe | bytes/vector | build s | ms / mention (batched) | recall@16 vs flat |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| flat | – | – | {4 * d} | – | {flat_ms:.3f} | 1.000 |")
    for nlist in args.nlist:
        for kind, pq_m in (("ivf", 0), ("ivfpq", d // 8)):
            started = time.perf_counter()
            config = IndexConfig(kind=kind, nlist=nlist, nprobe=1, pq_m=pq_m)
            index, plan = build_index_from_shards(shards, n, d, config)
            build = time.perf_counter() - started
            if plan.kind == "flat":
                print(f"| {kind} nlist={nlist}: too few entities to train (< 39 per list), skipped |")
                continue
            for nprobe in args.nprobe:
                index.nprobe = nprobe
                ids, ms = timed_search(index, queries)
                size = pq_m or 4 * d
                print(f"| {plan.kind} | {plan.nlist} | {nprobe} | {size} | {build:.1f} | {ms:.3f} | "
                      f"{recall_at_k(ids, exact):.3f} |", flush=True)


def synthetic(args: argparse.Namespace) -> None:
    """Vectors from a seeded mixture of Gaussians (real KBs cluster; uniform noise is the worst case)."""
    n, d, shard = args.entities, args.dim, args.shard
    centers = np.random.default_rng(0).standard_normal((args.clusters, d)).astype(np.float32)

    def make(seed: int, size: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = centers[rng.integers(0, len(centers), size)] + 0.6 * rng.standard_normal((size, d), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def shards():
        return (make(1 + i, min(shard, n - start)) for i, start in enumerate(range(0, n, shard)))

    queries = make(10**6, args.queries)
    started = time.perf_counter()
    config = IndexConfig(kind="ivfpq", nlist=args.nlist, nprobe=args.nprobe[0], pq_m=args.pq_m or d // 8)
    index, plan = build_index_from_shards(shards, n, d, config)
    build = time.perf_counter() - started
    exact_scores = np.full((len(queries), K), -np.inf, np.float32)
    exact_ids = np.zeros((len(queries), K), np.int64)
    offset = 0
    for part in shards():  # exact top-16 by streaming the same shards again
        scores = queries @ part.T
        both_scores = np.concatenate([exact_scores, scores], axis=1)
        both_ids = np.concatenate([exact_ids, offset + np.arange(len(part))[None, :].repeat(len(queries), 0)], 1)
        top = np.argpartition(-both_scores, K, axis=1)[:, :K]
        exact_scores, exact_ids = np.take_along_axis(both_scores, top, 1), np.take_along_axis(both_ids, top, 1)
        offset += len(part)
    print(f"synthetic: {n} entities, d={d}, {args.clusters} clusters, shards of {shard}; "
          f"IVF-PQ nlist={plan.nlist} pq_m={plan.pq_m} trained on {plan.train_size}\n")
    print("| nprobe | ms / mention (batched) | recall@16 vs exact | build s | index GB | peak RSS GB |")
    print("|---:|---:|---:|---:|---:|---:|")
    size_gb = n * (plan.pq_m + 8) / 1e9  # codes + ids
    for nprobe in args.nprobe:
        index.nprobe = nprobe
        ids, ms = timed_search(index, queries)
        print(f"| {nprobe} | {ms:.3f} | {recall_at_k(ids, exact_ids):.3f} | {build:.0f} | {size_gb:.2f} | "
              f"{peak_rss_gb():.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("real")
    r.add_argument("--artifacts", default="artifacts")
    r.add_argument("--retrieve", required=True, help="key of a retrieve artifact (its index and val mentions)")
    r.add_argument("--nlist", type=int, nargs="+", default=[64, 256])
    r.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 32])
    s = sub.add_parser("synthetic")
    s.add_argument("--entities", type=int, default=10_000_000)
    s.add_argument("--dim", type=int, default=768)
    s.add_argument("--clusters", type=int, default=2000)
    s.add_argument("--shard", type=int, default=200_000)
    s.add_argument("--nlist", type=int, default=4096)
    s.add_argument("--pq-m", type=int, default=0)
    s.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    s.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    real(args) if args.what == "real" else synthetic(args)


if __name__ == "__main__":
    main()
