import numpy as np
import pytest

from kgmel_core.config import IndexConfig
from kgmel_core.retrieval.index import build_index, load_index, save_index, search, to_search_device


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_matches_brute_force_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    entities, queries = _unit(rng, 500, 16), _unit(rng, 20, 16)
    index = build_index(entities, IndexConfig(kind="flat"))
    scores, ids = search(index, queries, 5)
    brute = np.argsort(-(queries @ entities.T), axis=1)[:, :5]
    assert (ids == brute).all()
    save_index(index, tmp_path / "x.faiss")
    assert (search(load_index(tmp_path / "x.faiss"), queries, 5)[1] == ids).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_exact_copies(kind):
    rng = np.random.default_rng(1)
    entities = _unit(rng, 3000, 16)
    index = build_index(entities, IndexConfig(kind=kind, nlist=16, nprobe=16))
    _, ids = search(index, entities[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.95


def test_k_larger_than_kb_and_gpu_modes():
    entities = _unit(np.random.default_rng(2), 3, 4)
    index = build_index(entities, IndexConfig())
    assert search(index, entities, 16)[1].shape == (3, 3)
    assert to_search_device(index, IndexConfig(use_gpu="never"))[1] == "cpu"
    from kgmel_core.retrieval.index import gpu_count

    if gpu_count() == 0:
        with pytest.raises(RuntimeError, match="sees no GPU"):
            to_search_device(index, IndexConfig(use_gpu="always"))
        assert to_search_device(index, IndexConfig(use_gpu="auto"))[1] == "cpu"
