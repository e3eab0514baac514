"""FAISS inner-product index over fused entity vectors (vectors are L2-normalised: IP = cosine).

`flat` is exact and the default below a million entities; `ivf` and `hnsw` trade a little recall
for speed on large KBs. A GPU is used only when faiss reports one: on a GPU-less machine
`index_cpu_to_all_gpus` returns an index whose `add` fails with a bare AssertionError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


def build_index(vectors: np.ndarray, config: IndexConfig):
    """An index over `vectors` (float32 [n, d]); the CPU version, so it can be saved as is."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if config.kind == "flat" or n < 4 * config.nlist and config.kind == "ivf":
        # IVF needs many points per list to train; small KBs fall back to exact search.
        index = faiss.IndexFlatIP(d)
    elif config.kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, config.nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = config.nprobe
    else:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(config.hnsw_ef_search, config.top_k)
    index.add(vectors)
    return index


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
