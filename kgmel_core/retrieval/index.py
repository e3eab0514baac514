"""FAISS inner-product index over fused entity vectors (vectors are L2-normalised: IP = cosine).

`flat` is exact and the default below a million entities. For larger KBs (and past RAM) `ivfpq`
stores each vector as `pq_m` bytes in `nlist` inverted lists; `auto` picks flat below
`auto_threshold` entities and IVF-PQ above, with parameters derived from the KB size (nlist ~
4 sqrt(n), a power of two; one byte per 8 dimensions). Every index is built from shards: an
approximate one is trained on a sample, then each shard of vectors is added, so the full matrix never
has to be in memory. `ivf` (IVF-Flat) and `hnsw` stay available. A GPU is used only when faiss
reports one: on a GPU-less machine `index_cpu_to_all_gpus` returns an index whose `add` fails with a
bare AssertionError.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kgmel_core.config import IndexConfig


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "faiss is not installed: pip install 'kgmel[cpu]' (or 'kgmel[gpu]' on a CUDA machine)"
        ) from exc
    return faiss


def gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass(frozen=True)
class IndexPlan:
    """What will be built for a KB of `n` vectors of width `d`."""

    kind: str  # flat | ivf | ivfpq | hnsw
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    train_size: int = 0


def plan_index(n: int, d: int, config: IndexConfig) -> IndexPlan:
    """Resolve `auto` and the derived IVF parameters; small KBs fall back to exact search (an IVF
    needs tens of points per list to train)."""
    kind = config.kind
    if kind == "auto":
        kind = "flat" if n < config.auto_threshold else "ivfpq"
    if kind in ("ivf", "ivfpq"):
        nlist = config.nlist or max(16, 1 << round(math.log2(4 * math.sqrt(max(n, 1)))))
        if n < 39 * nlist:
            return IndexPlan("flat")
        nprobe = config.nprobe or max(8, nlist // 64)
        pq_m = 0
        if kind == "ivfpq":
            pq_m = config.pq_m or next(m for m in (d // 8, d // 4, d // 2, d) if m and d % m == 0)
            if d % pq_m:
                raise ValueError(f"index.pq_m={pq_m} must divide the vector width {d}")
        # k-means costs iterations x sample x nlist x d: ~40 points a centroid is what faiss asks for
        return IndexPlan(kind, nlist, nprobe, pq_m, min(n, max(40 * nlist, 20_000)))
    return IndexPlan(kind)


def new_index(plan: IndexPlan, d: int, config: IndexConfig):
    faiss = _faiss()
    if plan.kind == "flat":
        return faiss.IndexFlatIP(d)
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(config.hnsw_ef_search, config.top_k)
        return index
    # Assigning 10M vectors to 4096+ lists by brute force costs hours on a CPU; an HNSW graph over the
    # centroids finds the list in a few dozen distance computations.
    hnsw = plan.nlist >= 4096
    quantizer = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if hnsw else faiss.IndexFlatIP(d)
    if plan.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, plan.nlist, plan.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = plan.nprobe
    return index


def build_index_from_shards(
    shards: Callable[[], Iterable[np.ndarray]], n: int, d: int, config: IndexConfig, seed: int = 0
) -> tuple[Any, IndexPlan]:
    """An index over the vectors the `shards()` iterator yields (called twice for an approximate index:
    once to draw the training sample, once to add); only one shard is in memory at a time."""
    plan = plan_index(n, d, config)
    index = new_index(plan, d, config)
    if plan.train_size:
        rng = np.random.default_rng(seed)
        keep = np.zeros(n, dtype=bool)
        keep[rng.choice(n, plan.train_size, replace=False)] = True
        sample, seen = [], 0
        for shard in shards():
            sample.append(shard[keep[seen : seen + len(shard)]])
            seen += len(shard)
        index.train(np.ascontiguousarray(np.concatenate(sample), dtype=np.float32))
    for shard in shards():
        index.add(np.ascontiguousarray(shard, dtype=np.float32))
    return index, plan


def build_index(vectors: np.ndarray, config: IndexConfig):
    """An index over an in-memory matrix (float32 [n, d]); the CPU version, so it can be saved as is."""
    n, d = vectors.shape
    step = 1 << 16
    return build_index_from_shards(lambda: (vectors[i : i + step] for i in range(0, n, step)), n, d, config)[0]


def to_search_device(index, config: IndexConfig):
    """Move an index to the GPU when asked (`always`) or possible (`auto`); returns (index, device)."""
    gpus = gpu_count() if config.use_gpu != "never" else 0
    if config.use_gpu == "always" and gpus == 0:
        raise RuntimeError("index.use_gpu=always but faiss sees no GPU (is faiss-gpu installed and a GPU present?)")
    if gpus == 0:
        return index, "cpu"
    faiss = _faiss()
    return faiss.index_cpu_to_all_gpus(index), f"gpu x{gpus}"


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, row ids); rows beyond the index size come back as id -1 and are dropped later."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(queries, min(k, index.ntotal))


def save_index(index, path: Path) -> None:
    _faiss().write_index(index, str(path))


def load_index(path: Path):
    return _faiss().read_index(str(path))


@functools.cache
def _cached_index(path: str):
    return load_index(Path(path))


def search_file(path: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`search` with the index read from `path` once per process: a shard of queries on a Dask worker."""
    return search(_cached_index(path), queries, k)


def candidates_table(mention_ids: list[str], scores: np.ndarray, rows: np.ndarray, qids: list[str]) -> pl.DataFrame:
    """FAISS's answer as `candidates` rows (mention, rank from 1, qid, score). FAISS pads a short answer
    (fewer indexed entities than k, or an IVF probe that found fewer) with row -1: those are dropped, not
    turned into a candidate."""
    k = rows.shape[1]
    frame = pl.DataFrame(
        {
            "mention_id": np.repeat(np.array(mention_ids, dtype=object), k).tolist(),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(mention_ids)),
            "row": rows.reshape(-1),
            "score": scores.reshape(-1).astype(np.float32),
        },
        schema={"mention_id": pl.String, "rank": pl.Int32, "row": pl.Int64, "score": pl.Float32},
    ).filter(pl.col("row") >= 0)
    return frame.with_columns(qid=pl.Series(qids, dtype=pl.String).gather(frame["row"])).select(
        "mention_id", "rank", "qid", "score"
    )
