"""Retrieval latency: ms per mention for top-16 search vs. KB size (random unit vectors).

python -m bench.retrieval_latency [--dim 512] [--sizes 10000 100000 1000000] [--queries 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kgmel_core.config import IndexConfig
from kgmel_core.retrieval.index import build_index, search


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    queries = _unit(rng, args.queries, args.dim)
    print(f"dim {args.dim}, {args.queries} queries per batch, top-{args.k}, CPU")
    print("| KB size | index | build s | ms / mention (batch) | ms / mention (one at a time) | recall@16 vs flat |")
    print("|---:|---|---:|---:|---:|---:|")
    for size in args.sizes:
        entities = _unit(rng, size, args.dim)
        kinds = ["flat", "ivf"] + (["hnsw"] if size <= 100_000 else [])
        exact = None
        for kind in kinds:
            config = IndexConfig(kind=kind, nlist=max(16, int(size**0.5)), nprobe=16)
            start = time.perf_counter()
            index = build_index(entities, config)
            built = time.perf_counter() - start
            start = time.perf_counter()
            _, ids = search(index, queries, args.k)
            batch_ms = 1000 * (time.perf_counter() - start) / len(queries)
            single = queries[:32]
            start = time.perf_counter()
            for q in single:
                search(index, q[None, :], args.k)
            single_ms = 1000 * (time.perf_counter() - start) / len(single)
            if exact is None:
                exact = ids
            recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact, strict=True)])
            print(f"| {size:,} | {kind} | {built:.1f} | {batch_ms:.3f} | {single_ms:.3f} | {recall:.3f} |")
        del entities


if __name__ == "__main__":
    main()
