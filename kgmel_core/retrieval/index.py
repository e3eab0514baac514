"""FAISS inner-product index over fused entity vectors (vectors are L2-normalised: IP = cosine).

`flat` is exact and the default below a million entities. For larger KBs (and past RAM) `ivfpq`
stores each vector as `pq_m` codes of `pq_nbits` bits in `nlist` inverted lists; `auto` picks flat below
`auto_threshold` entities and IVF-PQ above, with parameters derived from the KB size (nlist ~ sqrt(n),
a power of two, at most 4,096; probing lists that hold ~375 sqrt(n) vectors; one code per 8 dimensions)
and re-scores its shortlist exactly against the full vectors, read row by row from disk (`rescore.py`).
Every index is built from shards: an approximate one is trained on a sample, then each shard of vectors
is added, so the full matrix never has to be in memory. `ivfsq` keeps 4-8 bits a dimension instead of PQ
codes (re-scored the same way): for KBs of tight clusters, whose near-ties PQ cannot order. `auto` tells
such a KB from its built IVF-PQ: when the PQ shortlist loses its held vectors' neighbours, it re-files the
vectors as IVF-SQ in the same lists and keeps whichever finds more of them (`measured_choice`). `ivf`
(IVF-Flat) and `hnsw` stay available. A GPU is used only when faiss reports one: on a GPU-less machine
`index_cpu_to_all_gpus` returns an index whose `add` fails with a bare AssertionError.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kgmel_core.config import IndexConfig
from kgmel_core.retrieval import rescore


def _faiss():
    # torch first, always: faiss-cpu ships its own OpenMP runtime, and only a faiss loaded after torch binds
    # to torch's instead. With two runtimes each keeps its own spinning threads, and on a 2-core machine a
    # re-scored search (FAISS in one thread, torch in the other) ran 1.4x slower.
    import torch  # noqa: F401

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

    kind: str  # flat | ivf | ivfpq | ivfsq | hnsw
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    train_size: int = 0
    rescore: int = 0  # shortlist re-scored exactly (ivfpq, ivfsq; 0: the first pass's answer is final)


RECALL_K = 16  # the recall an approximate index is measured by on its held KB vectors (the retriever's usual top-K)
LOW_HELD_RECALL = 0.9  # below this an approximate index loses right answers the reranker never sees
AUTO_TARGET_RECALL = 0.95  # auto keeps IVF-PQ at or above this held recall, and stops probing IVF-SQ once there
AUTO_SQ_NPROBES = (8, 16, 32, 64)  # IVF-SQ scans 8x PQ's bytes a list: it pays off with few lists probed


@dataclass(frozen=True)
class BuiltIndex:
    index: Any
    plan: IndexPlan
    held: np.ndarray  # KB vectors drawn (with the training sample) to measure the built index's recall
    held_exact: np.ndarray | None = None  # their exact top-RECALL_K rows, where the build measured them
    measured: dict[str, float] = field(default_factory=dict)  # auto's held recall@16 of each plan it tried


def plan_index(n: int, d: int, config: IndexConfig) -> IndexPlan:
    """Resolve `auto` and the derived IVF parameters; small KBs fall back to exact search (an IVF
    needs tens of points per list to train)."""
    kind = config.kind
    if kind == "auto":
        kind = "flat" if n < config.auto_threshold else "ivfpq"
    if kind in ("ivf", "ivfpq", "ivfsq"):
        # ~sqrt(n) lists, at most 4,096: k-means over 40 points a list costs sample x nlist x d an
        # iteration, and 16,384 lists would take hours on 2 cores
        nlist = config.nlist or min(4096, max(16, 1 << round(math.log2(math.sqrt(max(n, 1))))))
        if n < 39 * nlist:
            return IndexPlan("flat")
        # A real mention's true top-16 spreads over more lists as the KB grows: probing lists that hold
        # ~375 sqrt(n) vectors keeps its re-scored recall@16 at ~0.97-0.98 on real-like KBs of 1M and 10M
        # (docs/scaling.md); a fixed share of the lists loses it at 1M or costs too much at 10M.
        nprobe = config.nprobe or min(nlist, max(8, round(375 * nlist / math.sqrt(n))))
        pq_m = rescore = 0
        if kind == "ivfpq":
            pq_m = config.pq_m or next(m for m in (d // 8, d // 4, d // 2, d) if m and d % m == 0)
            if d % pq_m:
                raise ValueError(f"index.pq_m={pq_m} must divide the vector width {d}")
        if kind != "ivf":
            rescore = config.rescore if config.rescore is not None else max(256, 16 * config.top_k)
        # k-means costs iterations x sample x nlist x d: ~40 points a centroid is what faiss asks for
        return IndexPlan(kind, nlist, nprobe, pq_m, min(n, max(40 * nlist, 20_000)), rescore)
    return IndexPlan(kind)


def new_index(plan: IndexPlan, d: int, config: IndexConfig, quantizer=None):
    """An empty index for `plan`; an IVF one over `quantizer`'s lists where given (trained: its lists are kept)."""
    faiss = _faiss()
    if plan.kind == "flat":
        return faiss.IndexFlatIP(d)
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(config.hnsw_ef_search, config.top_k)
        return index
    # Assigning 10M vectors to 4096+ lists by brute force costs hours on a CPU; an HNSW graph over the
    # centroids finds the list in a few dozen distance computations.
    if quantizer is None:
        hnsw = plan.nlist >= 4096
        quantizer = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if hnsw else faiss.IndexFlatIP(d)
    if plan.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    elif plan.kind == "ivfsq":
        bits = {4: faiss.ScalarQuantizer.QT_4bit, 6: faiss.ScalarQuantizer.QT_6bit, 8: faiss.ScalarQuantizer.QT_8bit}
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, plan.nlist, bits[config.sq_bits],
                                              faiss.METRIC_INNER_PRODUCT)  # codes of the residuals to the lists
    elif config.pq_nbits == 4:
        index = faiss.IndexIVFPQFastScan(quantizer, d, plan.nlist, plan.pq_m, 4, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, plan.nlist, plan.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    set_nprobe(index, plan.nprobe)
    return index


def set_nprobe(index, nprobe: int, breadth: int | None = None) -> None:
    """Probe `nprobe` lists. An HNSW quantizer asked for more lists than its search breadth returns
    fewer (k=1024 at efSearch 16 found ~700 of 4,096 lists), so its breadth follows nprobe (`breadth`
    sets it outright: adding vectors needs one list each, and a broad search there costs hours at 10M)."""
    index.nprobe = nprobe
    hnsw = getattr(_faiss().downcast_index(index.quantizer), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = breadth if breadth is not None else max(16, 2 * nprobe)


def build_index_from_shards(
    shards: Callable[[], Iterable[np.ndarray]],
    n: int,
    d: int,
    config: IndexConfig,
    seed: int = 0,
    vectors_path: Path | None = None,
    held: int = 200,
) -> BuiltIndex:
    """An index over the vectors the `shards()` iterator yields (called twice for an approximate index:
    once to draw the training sample, once to add); only one shard is in memory at a time. A plan that
    re-scores writes the full vectors to `vectors_path` during the add pass."""
    plan = plan_index(n, d, config)
    if plan.rescore and vectors_path is None:
        raise ValueError(f"index {plan.kind} re-scores its top {plan.rescore}: it needs a vectors_path")
    index = new_index(plan, d, config)
    if plan.nprobe:  # an HNSW quantizer assigns each added vector to one list: a narrow search suffices
        set_nprobe(index, 1, breadth=16)
    held_rows = sample = np.zeros((0, d), np.float32)
    if plan.train_size:
        sample, held_rows = samples_of_rows(shards(), n, [plan.train_size, min(held, n)], seed)
        index.train(sample)
    with open(vectors_path, "wb") if plan.rescore else contextlib.nullcontext() as vectors:
        if vectors:
            rescore.write_header(vectors, n, d, config.rescore_dtype)
        for shard in shards():
            index.add(np.ascontiguousarray(shard, dtype=np.float32))
            if vectors:
                rescore.write_rows(vectors, shard, config.rescore_dtype)
    if plan.nprobe:
        set_nprobe(index, plan.nprobe)
    built = BuiltIndex(index, plan, held_rows)
    if config.kind == "auto" and plan.kind == "ivfpq" and len(held_rows):
        return measured_choice(built, shards, sample, config, vectors_path)
    return built


def measured_choice(built: BuiltIndex, shards: Callable[[], Iterable[np.ndarray]], sample: np.ndarray,
                    config: IndexConfig, vectors_path: Path) -> BuiltIndex:
    """`auto`'s IVF-PQ, or the same lists holding scalar-quantised vectors where that finds more.

    PQ codes suit a KB whose neighbours spread over many lists (real entity embeddings: the plan probes
    hundreds), and fail a KB of tight clusters, whose near-ties they cannot order however many lists are
    probed. Which KB this is shows only in the built index, so the held vectors' recall@16 decides: below
    the target, the vectors are re-filed as IVF-SQ under the same trained lists (each in the list PQ gave
    it: no coarse search, no k-means), read back from the vectors file, and probed with few lists."""
    exact = exact_top_k(shards(), built.held, RECALL_K)
    pq_recall = held_recall(built.index, built.plan, vectors_path, built.held, exact)
    measured = {f"ivfpq nprobe={built.plan.nprobe}": round(pq_recall, 4)}
    if pq_recall >= AUTO_TARGET_RECALL:
        return replace(built, held_exact=exact, measured=measured)
    sq = _ivfsq_in_the_same_lists(built.index, sample, config, vectors_path)
    best, best_recall = None, pq_recall
    for nprobe in AUTO_SQ_NPROBES:
        if nprobe > built.plan.nlist:
            break
        plan = replace(built.plan, kind="ivfsq", nprobe=nprobe, pq_m=0)
        set_nprobe(sq, nprobe)
        recall = held_recall(sq, plan, vectors_path, built.held, exact)
        measured[f"ivfsq nprobe={nprobe}"] = round(recall, 4)
        if recall > best_recall:
            best, best_recall = plan, recall
        if recall >= AUTO_TARGET_RECALL:
            break
    if best is None:
        return replace(built, held_exact=exact, measured=measured)
    set_nprobe(sq, best.nprobe)
    return BuiltIndex(sq, best, built.held, exact, measured)


def kept_measured_choice(wanted: IndexPlan, built: IndexPlan, measured: dict | None) -> IndexPlan:
    """The plan to grow an index by: `auto` plans IVF-PQ, but where it measured IVF-SQ to be better for
    this KB (`measured`: the index manifest's record), appending keeps those lists and that probe (a
    rebuild measures again)."""
    if measured and (wanted.kind, built.kind) == ("ivfpq", "ivfsq") and wanted.nlist == built.nlist:
        return replace(wanted, kind="ivfsq", nprobe=built.nprobe, pq_m=0)
    return wanted


def held_recall(index, plan: IndexPlan, vectors_path: Path | None, held: np.ndarray, exact: np.ndarray) -> float:
    """Recall@16 of the index as it will search (its shortlist re-scored) for KB vectors it holds. The
    vectors file is the one the build just wrote: the pairing check for files read back is not needed."""
    searcher = rescoring(index, vectors_path, plan.rescore, check_pairing=False)
    return recall_at_k(search(searcher, held, RECALL_K)[1], exact)


def list_assignment(index) -> np.ndarray:
    """The list each vector of an IVF index is filed under, by row id."""
    ivf = _faiss().extract_index_ivf(index)
    assignment = np.full(ivf.ntotal, -1, np.int64)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            assignment[_faiss().rev_swig_ptr(ivf.invlists.get_ids(lst), size)] = lst
    return assignment


def _ivfsq_in_the_same_lists(pq, sample: np.ndarray, config: IndexConfig, vectors_path: Path):
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(pq)
    sq = new_index(IndexPlan("ivfsq", ivf.nlist), ivf.d, config, quantizer=faiss.clone_index(ivf.quantizer))
    sq.train(sample)  # the quantizer holds nlist centroids already: this trains the SQ ranges only
    assignment = list_assignment(pq)
    for start, rows in with_offsets(rescore.rows_in_order(vectors_path, ivf.ntotal, ivf.d)):
        lists = np.ascontiguousarray(assignment[start : start + len(rows)])
        sq.add_core(len(rows), faiss.swig_ptr(rows), None, faiss.swig_ptr(lists))
    return sq


def with_offsets(chunks: Iterable[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """Each chunk of a row stream with the index of its first row."""
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += len(chunk)


def samples_of_rows(shards: Iterable[np.ndarray], n: int, sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    """For each of `sizes`, that many of the `n` rows the shards hold, drawn at random (seeded; each
    sample drawn independently of the others, in order, from one generator) in a single pass over the
    shards, in row order: the KB's vectors are read once however many samples are wanted."""
    rng = np.random.default_rng(seed)
    picks = []
    for size in sizes:
        pick = np.zeros(n, dtype=bool)
        pick[rng.choice(n, min(size, n), replace=False)] = True
        picks.append(pick)
    rows: list[list[np.ndarray]] = [[] for _ in sizes]
    seen = 0
    for shard in shards:
        for kept, pick in zip(rows, picks, strict=True):
            kept.append(np.asarray(shard[pick[seen : seen + len(shard)]], dtype=np.float32))
        seen += len(shard)
    return [np.ascontiguousarray(np.concatenate(kept)) if kept else np.zeros((0, 0), np.float32) for kept in rows]


def sample_rows(shards: Iterable[np.ndarray], n: int, size: int, seed: int = 0) -> np.ndarray:
    """`size` of the `n` rows the shards hold, drawn at random (seeded) in one pass, in row order."""
    return samples_of_rows(shards, n, [size], seed)[0]


def append_vectors(index, vectors: np.ndarray) -> None:
    """Add rows to a built index (ids continue from `ntotal`); an IVF files each under its nearest list,
    found with the same narrow quantizer search the build used, and keeps probing as before."""
    nprobe = getattr(index, "nprobe", 0)
    if nprobe:
        set_nprobe(index, 1, breadth=16)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    if nprobe:
        set_nprobe(index, nprobe)


def ivf_centroids(index) -> np.ndarray | None:
    """The list centroids of an IVF index (None for an index without lists)."""
    try:
        ivf = _faiss().extract_index_ivf(index)
    except RuntimeError:
        return None
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def build_index(vectors: np.ndarray, config: IndexConfig):
    """An index over an in-memory matrix (float32 [n, d]); the CPU version, so it can be saved as is."""
    n, d = vectors.shape
    step = 1 << 16
    return build_index_from_shards(lambda: (vectors[i : i + step] for i in range(0, n, step)), n, d, config).index


def to_search_device(index, config: IndexConfig):
    """Move an index to the GPU when asked (`always`) or possible (`auto`); returns (index, device).
    Under `auto`, an index type faiss-gpu does not implement (fast-scan PQ) stays on the CPU, and says so."""
    gpus = gpu_count() if config.use_gpu != "never" else 0
    if config.use_gpu == "always" and gpus == 0:
        raise RuntimeError("index.use_gpu=always but faiss sees no GPU (is faiss-gpu installed and a GPU present?)")
    if gpus == 0:
        return index, "cpu"
    try:
        return _faiss().index_cpu_to_all_gpus(index), f"gpu x{gpus}"
    except RuntimeError as exc:
        if config.use_gpu == "always":
            raise RuntimeError(f"index.use_gpu=always but faiss-gpu cannot hold this index: {exc}") from exc
        return index, f"cpu ({type(index).__name__} has no GPU version)"


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, row ids); rows beyond the index size come back as id -1 and are dropped later."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(queries, min(k, index.ntotal))


def save_index(index, path: Path) -> None:
    _faiss().write_index(index, str(path))


def load_index(path: Path):
    return _faiss().read_index(str(path))


def open_searcher(index_path: Path | str, vectors_path: Path | str | None = None, shortlist: int = 0, config=None):
    """The saved index, moved to the search device (`config.use_gpu`), re-scoring its top `shortlist`
    from `vectors_path` when the index was built to (checked to be the file it was built with)."""
    index = load_index(Path(index_path))
    device = "cpu"
    if config is not None:
        index, device = to_search_device(index, config)
    return rescoring(index, vectors_path, shortlist), f"{device}, top {shortlist} re-scored" if shortlist else device


def rescoring(index, vectors_path: Path | str | None, shortlist: int, check_pairing: bool = True):
    """`index` itself, or, when it re-scores, wrapped with its vectors file (checked to be the file it was
    built with, unless the caller has just written that file)."""
    if not shortlist:
        return index
    searcher = rescore.RescoredIndex(index, vectors_path, shortlist)
    if check_pairing:
        searcher.check_pairing()
    return searcher


@functools.cache
def _cached_searcher(path: str, vectors_path: str | None, shortlist: int):
    return open_searcher(path, vectors_path, shortlist)[0]


def search_file(
    path: str, vectors_path: str | None, shortlist: int, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """`search` with the index read from `path` once per process: a shard of queries on a Dask worker."""
    return search(_cached_searcher(path, vectors_path, shortlist), queries, k)


def exact_top_k(shards: Iterable[np.ndarray], queries: np.ndarray, k: int, block: int = 1 << 15) -> np.ndarray:
    """Row ids of the exact top-k inner products, streaming the KB shard by shard, `block` rows at a
    time (the ground truth an approximate index is measured against, at any KB size, in bounded memory)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    offset = 0
    for shard in shards:
        for start in range(0, len(shard), block):
            scores = queries @ np.asarray(shard[start : start + block], dtype=np.float32).T
            ids = np.broadcast_to(offset + start + np.arange(scores.shape[1]), scores.shape)
            both_scores, both_ids = np.concatenate([best_scores, scores], 1), np.concatenate([best_ids, ids], 1)
            if both_scores.shape[1] > k:
                top = np.argpartition(-both_scores, k - 1, axis=1)[:, :k]
                both_scores, both_ids = np.take_along_axis(both_scores, top, 1), np.take_along_axis(both_ids, top, 1)
            best_scores, best_ids = both_scores, both_ids
        offset += len(shard)
    return np.take_along_axis(best_ids, np.argsort(-best_scores, axis=1, kind="stable"), 1)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k that the approximate top-k holds (per query, averaged)."""
    if not len(exact):
        return float("nan")
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def low_recall_advice(plan: IndexPlan, recall: float) -> str | None:
    """What to change when a built index finds too little of its held vectors' exact top-16 (None: it
    does not). The held vectors are KB rows, easier queries than mentions: mentions fare worse still."""
    if plan.kind == "flat" or not recall < LOW_HELD_RECALL:
        return None
    found = f"the {plan.kind} index finds {recall:.2f} of its held KB vectors' exact top-16"
    if plan.kind == "ivfpq":
        return (f"{found}: likely a KB of tight clusters, whose near-ties PQ codes cannot shortlist. index.kind: ivfsq "
                f"with a small index.nprobe keeps such a KB's recall (docs/scaling.md); so does a larger "
                f"index.rescore, at a cost")
    if plan.kind == "hnsw":
        return f"{found}: raise index.hnsw_ef_search"
    return f"{found}: raise index.nprobe (now {plan.nprobe} of {plan.nlist} lists) or index.rescore"


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
