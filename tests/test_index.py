import subprocess
import sys

import numpy as np
import pytest

from kgmel_core.config import IndexConfig
from kgmel_core.retrieval.index import (
    IndexPlan,
    build_index,
    build_index_from_shards,
    candidates_table,
    load_index,
    low_recall_advice,
    plan_index,
    save_index,
    search,
    to_search_device,
)


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


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "ivfsq", "hnsw"])
def test_approximate_indexes_find_exact_copies(kind):
    rng = np.random.default_rng(1)
    entities = _unit(rng, 3000, 16)
    index = build_index(entities, IndexConfig(kind=kind, nlist=16, nprobe=16, pq_m=8, rescore=0))
    _, ids = search(index, entities[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= (0.8 if kind == "ivfpq" else 0.95)  # PQ codes are lossy


def test_auto_plans_flat_for_small_kbs_and_derived_ivfpq_for_large_ones():
    assert plan_index(50_000, 768, IndexConfig()).kind == "flat"
    plan = plan_index(10_000_000, 768, IndexConfig())
    # lists holding ~375 sqrt(n) vectors probed: 375 * 4096 / sqrt(1e7) = 485.7
    assert (plan.kind, plan.nlist, plan.nprobe, plan.pq_m) == ("ivfpq", 4096, 486, 96)
    assert plan.train_size == 40 * 4096
    million = plan_index(1_000_000, 768, IndexConfig())  # 375 * 1024 / 1000 = 384
    assert (million.nlist, million.nprobe, million.rescore) == (1024, 384, 256)
    assert plan_index(5_000, 768, IndexConfig(kind="ivfpq", nlist=1024)).kind == "flat"  # too few to train


def test_a_sharded_build_equals_the_whole_matrix_build():
    rng = np.random.default_rng(3)
    entities, queries = _unit(rng, 4000, 16), _unit(rng, 30, 16)
    config = IndexConfig(kind="ivf", nlist=32, nprobe=4)
    whole = build_index(entities, config)
    built = build_index_from_shards(lambda: (entities[i : i + 700] for i in range(0, 4000, 700)), 4000, 16, config)
    sharded, plan = built.index, built.plan
    assert plan.kind == "ivf" and sharded.ntotal == 4000
    assert (search(whole, queries, 5)[1] == search(sharded, queries, 5)[1]).all()


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


def test_candidates_table_numbers_ranks_from_one_and_drops_faiss_padding():
    scores = np.array([[0.9, 0.5, -1.0], [0.8, 0.7, 0.1]], dtype=np.float32)
    rows = np.array([[2, 0, -1], [1, 2, 0]])  # FAISS pads a short answer with row -1
    table = candidates_table(["m1", "m2"], scores, rows, ["Q10", "Q11", "Q12"])
    assert table.columns == ["mention_id", "rank", "qid", "score"]
    assert table.select("mention_id", "rank", "qid").rows() == [
        ("m1", 1, "Q12"), ("m1", 2, "Q10"), ("m2", 1, "Q11"), ("m2", 2, "Q12"), ("m2", 3, "Q10"),
    ]
    assert table["score"].to_list()[:2] == pytest.approx([0.9, 0.5])
    assert candidates_table([], np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), ["Q10"]).height == 0


def test_an_index_faiss_gpu_cannot_hold_stays_on_the_cpu_under_auto_and_fails_under_always(monkeypatch):
    from kgmel_core.retrieval import index as index_module

    class NoGpuVersion:
        def index_cpu_to_all_gpus(self, index):
            raise RuntimeError("This index type is not implemented on GPU")

    cpu_index = build_index(_unit(np.random.default_rng(2), 3, 4), IndexConfig())
    monkeypatch.setattr(index_module, "gpu_count", lambda: 1)
    monkeypatch.setattr(index_module, "_faiss", lambda: NoGpuVersion())
    index, device = to_search_device(cpu_index, IndexConfig(use_gpu="auto"))
    assert index is cpu_index and device == "cpu (IndexFlatIP has no GPU version)"
    with pytest.raises(RuntimeError, match="cannot hold this index: This index type is not implemented"):
        to_search_device(cpu_index, IndexConfig(use_gpu="always"))


def test_a_low_held_recall_names_the_setting_to_change():
    pq = IndexPlan("ivfpq", 4096, 486, 96, 0, 256)
    assert low_recall_advice(pq, 0.96) is None
    assert "index.kind: ivfsq" in low_recall_advice(pq, 0.29)
    assert "index.nprobe (now 8 of 4096 lists)" in low_recall_advice(IndexPlan("ivfsq", 4096, 8, 0, 0, 256), 0.5)
    assert "index.hnsw_ef_search" in low_recall_advice(IndexPlan("hnsw"), 0.5)
    assert low_recall_advice(IndexPlan("flat"), 0.0) is None  # exact: nothing to tune
    assert low_recall_advice(pq, float("nan")) is None  # nothing measured


def test_faiss_is_loaded_after_torch_so_the_two_share_one_openmp_runtime():
    """A fresh process: whichever way kgmel reaches faiss, torch was imported first (`_faiss`)."""
    code = ("import sys; from kgmel_core.retrieval.index import _faiss; _faiss(); names = list(sys.modules); "
            "print(names.index('torch') < names.index('faiss'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
