"""Exact re-scoring of an IVF-PQ (or IVF-SQ) shortlist from the vectors file: same answer as exact search
where the shortlist covers it, and a vectors file that is not the index's own is refused."""

from dataclasses import replace

import numpy as np
import pytest
from test_index import _unit

from kgmel_core.config import IndexConfig
from kgmel_core.retrieval import rescore
from kgmel_core.retrieval.index import (
    IndexPlan,
    build_index,
    build_index_from_shards,
    exact_top_k,
    kept_measured_choice,
    open_searcher,
    plan_index,
    recall_at_k,
    save_index,
    search,
)
from kgmel_core.retrieval.rescore import RescoredIndex, VectorsFileError


def _shards(vectors, step=700):
    return lambda: (vectors[i : i + step] for i in range(0, len(vectors), step))


def _build(tmp_path, entities, dtype="float32", shortlist=400, nbits=4, kind="ivfpq"):
    config = IndexConfig(kind=kind, nlist=16, nprobe=16, pq_m=8, pq_nbits=nbits, rescore=shortlist,
                         rescore_dtype=dtype)
    built = build_index_from_shards(_shards(entities), *entities.shape, config, vectors_path=tmp_path / "v.npy")
    save_index(built.index, tmp_path / "x.faiss")
    return built


def test_rescore_orders_a_shortlist_by_exact_score_and_keeps_padding_last():
    vectors = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.8, 0.6]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    shortlist = np.array([[1, 2, 3, -1], [0, -1, 3, 2]])
    scores, rows = rescore.rescore(queries, shortlist, vectors, 4)
    # query 1 . rows (1, 2, 3) = (0, .6, .8); query 2 . rows (0, 3, 2) = (0, .6, .8)
    assert rows.tolist() == [[3, 2, 1, -1], [2, 3, 0, -1]]
    assert scores[:, :3] == pytest.approx(np.array([[0.8, 0.6, 0.0], [0.8, 0.6, 0.0]]))
    assert np.isneginf(scores[:, 3]).all()


@pytest.mark.parametrize(("dtype", "nbits"), [("float32", 4), ("float16", 4), ("float32", 8)])
def test_rescoring_returns_exactly_the_flat_top_k_where_the_shortlist_covers_it(tmp_path, monkeypatch, dtype, nbits):
    monkeypatch.setattr(rescore, "SEARCH_CHUNK", 128)  # 300 queries: three pipelined chunks, the last one short
    rng = np.random.default_rng(0)
    entities, queries = _unit(rng, 3000, 16), _unit(rng, 300, 16)
    built = _build(tmp_path, entities, dtype, nbits=nbits)
    flat_scores, flat_ids = search(build_index(entities, IndexConfig(kind="flat")), queries, 10)
    _, shortlist = search(built.index, queries, 400)
    assert all(set(f) <= set(s) for f, s in zip(flat_ids, shortlist, strict=True))  # the premise: it covers
    pq_ids = search(built.index, queries, 10)[1]
    assert recall_at_k(pq_ids, flat_ids) < 0.9  # the PQ codes alone lose part of the exact top-10
    searcher, device = open_searcher(tmp_path / "x.faiss", tmp_path / "v.npy", 400)
    scores, ids = search(searcher, queries, 10)
    assert device == "cpu, top 400 re-scored"
    if dtype == "float32":
        assert (ids == flat_ids).all()
        assert scores == pytest.approx(flat_scores, abs=1e-5)
    else:  # fp16 rounding (~1e-3) may swap near-ties, never put a worse entity at a rank
        exact_scores_of_ids = np.einsum("bd,bkd->bk", queries, entities[ids])
        assert exact_scores_of_ids == pytest.approx(flat_scores, abs=2e-3)
        assert recall_at_k(ids, flat_ids) > 0.98


def test_an_ivfsq_shortlist_re_scored_is_exactly_the_flat_top_k(tmp_path):
    rng = np.random.default_rng(0)
    entities, queries = _unit(rng, 3000, 16), _unit(rng, 300, 16)
    _build(tmp_path, entities, kind="ivfsq")
    flat_scores, flat_ids = search(build_index(entities, IndexConfig(kind="flat")), queries, 10)
    searcher, device = open_searcher(tmp_path / "x.faiss", tmp_path / "v.npy", 400)
    scores, ids = search(searcher, queries, 10)
    assert device == "cpu, top 400 re-scored"
    assert (ids == flat_ids).all()
    assert scores == pytest.approx(flat_scores, abs=1e-5)


def test_scalar_codes_order_the_near_ties_of_tight_clusters_that_pq_codes_cannot():
    """Why `ivfsq` exists: in a tight cluster every point is almost as close to a query as the next, and
    the 4-bit PQ codes of an 8-dimensional slice are too coarse to shortlist the true top-16 among them."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((16, 64)).astype(np.float32)

    def draw(n):
        x = centers[rng.integers(0, 16, n)] + 0.6 * rng.standard_normal((n, 64)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    entities, queries = draw(4000), draw(100)
    exact = search(build_index(entities, IndexConfig(kind="flat")), queries, 16)[1]
    recall = {kind: recall_at_k(search(build_index(entities, IndexConfig(kind=kind, nlist=16, nprobe=2, pq_m=8,
                                                                         rescore=0)), queries, 16)[1], exact)
              for kind in ("ivfsq", "ivfpq")}
    assert recall["ivfsq"] > 0.7 > 0.2 > recall["ivfpq"]  # codes alone, no re-scoring (0.75 vs. 0.10)


def test_the_vectors_file_is_a_standard_npy_in_index_order(tmp_path):
    entities = _unit(np.random.default_rng(1), 1000, 16)
    _build(tmp_path, entities, "float16")
    stored = np.load(tmp_path / "v.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (1000, 16)
    assert np.abs(stored.astype(np.float32) - entities).max() < 1e-3


@pytest.mark.parametrize("cut", [-1, -4096, +16])
def test_a_truncated_or_padded_vectors_file_is_refused_naming_it(tmp_path, cut):
    entities = _unit(np.random.default_rng(2), 1000, 16)
    _build(tmp_path, entities)
    path = tmp_path / "v.npy"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut < 0 else data + bytes(cut))
    with pytest.raises(VectorsFileError, match="v.npy.*(truncated|trailing bytes)"):
        open_searcher(tmp_path / "x.faiss", path, 200)


def test_a_vectors_file_of_another_shape_or_not_npy_is_refused(tmp_path):
    entities = _unit(np.random.default_rng(3), 1000, 16)
    _build(tmp_path, entities)
    np.save(tmp_path / "short.npy", entities[:999].astype(np.float16))
    with pytest.raises(VectorsFileError, match="999 x 16 vectors, the index 1000 x 16"):
        RescoredIndex(open_searcher(tmp_path / "x.faiss")[0], tmp_path / "short.npy", 200)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(VectorsFileError, match="not a .npy vectors file"):
        RescoredIndex(open_searcher(tmp_path / "x.faiss")[0], tmp_path / "junk.npy", 200)


def test_vectors_of_another_build_with_the_same_shape_are_refused(tmp_path):
    rng = np.random.default_rng(4)
    _build(tmp_path, _unit(rng, 1000, 16))
    np.save(tmp_path / "other.npy", _unit(rng, 1000, 16).astype(np.float16))  # same shape, other KB
    with pytest.raises(VectorsFileError, match="not the ones this index was built from"):
        open_searcher(tmp_path / "x.faiss", tmp_path / "other.npy", 200)


def test_the_plan_rescores_ivfpq_and_ivfsq_only_and_a_rescoring_build_needs_a_file():
    assert plan_index(10_000_000, 768, IndexConfig()).rescore == 256
    sq = plan_index(10_000_000, 768, IndexConfig(kind="ivfsq"))
    assert (sq.kind, sq.nlist, sq.pq_m, sq.rescore) == ("ivfsq", 4096, 0, 256)
    assert plan_index(10_000_000, 768, IndexConfig(top_k=32)).rescore == 512
    assert plan_index(10_000_000, 768, IndexConfig(rescore=0)).rescore == 0
    assert plan_index(50_000, 768, IndexConfig(rescore=64)).rescore == 0  # flat is exact already
    assert plan_index(10_000_000, 768, IndexConfig(kind="ivf")).rescore == 0
    entities = _unit(np.random.default_rng(5), 1000, 16)
    with pytest.raises(ValueError, match="needs a vectors_path"):
        build_index(entities, IndexConfig(kind="ivfpq", nlist=16, pq_m=4))


def test_exact_top_k_streams_shards_to_the_brute_force_answer():
    rng = np.random.default_rng(6)
    entities, queries = _unit(rng, 2500, 8), _unit(rng, 20, 8)
    brute = np.argsort(-(queries @ entities.T), axis=1)[:, :16]
    assert (exact_top_k(_shards(entities, 333)(), queries, 16) == brute).all()
    assert (exact_top_k(_shards(entities, 700)(), queries, 16, block=100) == brute).all()
    assert recall_at_k(brute[:, ::-1], brute) == 1.0
    assert recall_at_k(brute[:, :8], brute[:, 8:]) == 0.0


def test_the_held_sample_is_drawn_from_the_kb_for_approximate_indexes_only(tmp_path):
    entities = _unit(np.random.default_rng(7), 3000, 16)
    built = _build(tmp_path, entities)
    assert built.held.shape == (200, 16)
    assert all(np.isclose(entities @ row, 1.0, atol=1e-5).any() for row in built.held[:20])
    flat = build_index_from_shards(_shards(entities), 3000, 16, IndexConfig(kind="flat"))
    assert flat.held.shape == (0, 16)


def test_an_hnsw_quantizer_searches_broadly_enough_to_return_nprobe_lists(tmp_path):
    import faiss

    from kgmel_core.retrieval.index import IndexPlan, load_index, new_index, set_nprobe

    index = new_index(IndexPlan("ivfpq", nlist=4096, nprobe=512, pq_m=4), 16, IndexConfig())
    assert faiss.downcast_index(index.quantizer).hnsw.efSearch == 1024
    save_index(index, tmp_path / "x.faiss")
    loaded = load_index(tmp_path / "x.faiss")
    assert loaded.nprobe == 512 and faiss.downcast_index(loaded.quantizer).hnsw.efSearch == 1024
    set_nprobe(loaded, 2048)
    assert faiss.downcast_index(loaded.quantizer).hnsw.efSearch == 4096


def test_vector_rows_read_what_the_array_holds_and_refuse_a_file_that_shrank(tmp_path):
    entities = _unit(np.random.default_rng(2), 1000, 16)
    _build(tmp_path, entities, "float16")
    ids = np.array([999, 0, 7, 7, 250])
    with rescore.VectorRows(tmp_path / "v.npy", 1000, 16) as rows_of:
        assert (rows_of[ids] == np.load(tmp_path / "v.npy")[ids]).all()
        with open(tmp_path / "v.npy", "r+b") as handle:  # cut after the check at open: a read comes up short
            handle.truncate(handle.seek(0, 2) - 32)
        with pytest.raises(VectorsFileError, match="row 999 could not be read whole"):
            rows_of[ids]


def test_prefetch_asks_for_each_row_in_ranges_cut_at_the_window_and_whole_windows_once(tmp_path, monkeypatch):
    monkeypatch.setattr(rescore, "PREFETCH_GAP", 256)  # 4 rows of 16 float32
    monkeypatch.setattr(rescore, "PREFETCH_WINDOW", 1024)  # 16 rows
    calls = []
    monkeypatch.setattr(rescore.os, "posix_fadvise", lambda fd, offset, length, advice: calls.append(
        (offset, length, advice)))
    with open(tmp_path / "v.npy", "wb") as handle:
        rescore.write_header(handle, 1000, 16, "float32")
        rescore.write_rows(handle, np.zeros((1000, 16), np.float32), "float32")
    dense = np.arange(600, 700)
    with rescore.VectorRows(tmp_path / "v.npy", 1000, 16) as rows_of:
        start = rows_of.offset
        rows_of.prefetch(np.array([[7, 5, 6, -1], [100, 103, 500, 5]]))
        # rows 5-7 one range; 100 and 103 (two rows apart, within the gap) one range; 500 alone; padding skipped
        assert calls == [(start + 5 * 64, 3 * 64, rescore.os.POSIX_FADV_WILLNEED),
                         (start + 100 * 64, 4 * 64, rescore.os.POSIX_FADV_WILLNEED),
                         (start + 500 * 64, 64, rescore.os.POSIX_FADV_WILLNEED)]
        calls.clear()
        rows_of.prefetch(dense)
        asked = [(offset, offset + length) for offset, length, _ in calls]
        assert all(low // 1024 == (high - 1) // 1024 for low, high in asked)  # never across a window
        assert asked[0][0] == start + 600 * 64 and asked[-1][1] == start + 700 * 64
        assert all(a[1] == b[0] for a, b in zip(asked, asked[1:], strict=False))  # one unbroken range
        whole = [(low, high) for low, high in asked if high - low == 1024]
        assert len(whole) >= 4
        calls.clear()
        rows_of.prefetch(dense)  # whole windows already asked for: only the two partial ends again
        assert [(offset, offset + length) for offset, length, _ in calls] == [asked[0], asked[-1]]


def test_the_rows_a_search_re_scores_were_prefetched_before_they_were_read(tmp_path, monkeypatch):
    monkeypatch.setattr(rescore, "SEARCH_CHUNK", 64)
    entities = _unit(np.random.default_rng(4), 1500, 16)
    _build(tmp_path, entities, "float16", shortlist=50)
    events = []
    prefetch, read = rescore.VectorRows.prefetch, rescore.VectorRows.__getitem__

    def logged(kind, method):
        return lambda self, ids: (events.append((kind, set(np.ravel(ids).tolist()))), method(self, ids))[1]

    monkeypatch.setattr(rescore.VectorRows, "prefetch", logged("prefetch", prefetch))
    monkeypatch.setattr(rescore.VectorRows, "__getitem__", logged("read", read))
    queries = _unit(np.random.default_rng(5), 200, 16)
    searcher, _ = open_searcher(tmp_path / "x.faiss", tmp_path / "v.npy", 50)
    events.clear()  # the pairing check at open reads its probe rows without a shortlist
    expected = search(searcher, queries, 10)
    asked: set[int] = set()
    for kind, rows in events:
        if kind == "prefetch":
            asked |= rows
        else:
            assert rows <= asked
    assert sum(kind == "read" for kind, _ in events) == len(queries)
    monkeypatch.delattr(rescore.os, "posix_fadvise")  # macOS, Windows: no advice, the same answer
    assert (search(searcher, queries, 10)[1] == expected[1]).all()


def _clusters(rng, n, centers, spread):
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, centers.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_auto_refiles_a_kb_of_tight_clusters_as_ivfsq_in_the_same_lists(tmp_path):
    rng = np.random.default_rng(0)
    entities = _clusters(rng, 30_000, rng.standard_normal((16, 64)), 0.6)  # ~1,900 near-ties a cluster
    config = IndexConfig(kind="auto", auto_threshold=1000)
    planned = plan_index(len(entities), 64, config)
    assert (planned.kind, planned.nlist, planned.nprobe, planned.rescore) == ("ivfpq", 128, 128, 256)
    built = build_index_from_shards(_shards(entities, 5000), *entities.shape, config, vectors_path=tmp_path / "v.npy")

    assert built.plan == replace(planned, kind="ivfsq", nprobe=built.plan.nprobe, pq_m=0)
    assert built.measured["ivfpq nprobe=128"] < 0.5  # the PQ shortlist of 256 misses most of the top-16
    assert built.measured[f"ivfsq nprobe={built.plan.nprobe}"] >= 0.95 and built.plan.nprobe <= 64
    assert list(built.measured)[-1] == f"ivfsq nprobe={built.plan.nprobe}"  # the probe stops at the target
    assert (built.held_exact == exact_top_k(_shards(entities, 5000)(), built.held, 16)).all()
    assert built.index.ntotal == len(entities)
    save_index(built.index, tmp_path / "x.faiss")  # served as the index stage serves it: file paired, re-scored
    searcher, _ = open_searcher(tmp_path / "x.faiss", tmp_path / "v.npy", built.plan.rescore)
    queries = entities[rng.choice(len(entities), 100, replace=False)]
    recall = recall_at_k(search(searcher, queries, 16)[1], exact_top_k(_shards(entities)(), queries, 16))
    assert recall >= 0.95


def test_auto_keeps_ivfpq_where_its_shortlist_holds_the_neighbours(tmp_path):
    rng = np.random.default_rng(1)
    entities = _clusters(rng, 20_000, rng.standard_normal((1000, 64)), 0.05)  # groups of ~20, far apart
    config = IndexConfig(kind="auto", auto_threshold=1000)
    built = build_index_from_shards(_shards(entities, 5000), *entities.shape, config, vectors_path=tmp_path / "v.npy")
    assert built.plan == plan_index(len(entities), 64, config)
    assert list(built.measured) == ["ivfpq nprobe=128"] and built.measured["ivfpq nprobe=128"] >= 0.95
    explicit = build_index_from_shards(_shards(entities, 5000), *entities.shape,
                                       config.model_copy(update={"kind": "ivfpq"}), vectors_path=tmp_path / "w.npy")
    assert not explicit.measured and explicit.held_exact is None  # only auto measures before choosing


def test_an_index_grown_keeps_the_kind_auto_measured_and_a_rebuild_measures_again():
    pq = IndexPlan("ivfpq", 4096, 486, 96, 163_840, 256)
    sq = IndexPlan("ivfsq", 4096, 8, 0, 0, 256)
    measured = {"ivfpq nprobe=486": 0.29, "ivfsq nprobe=8": 0.96}
    assert kept_measured_choice(pq, sq, measured) == IndexPlan("ivfsq", 4096, 8, 0, 163_840, 256)
    assert kept_measured_choice(pq, sq, None) == pq  # ivfsq set by hand, then auto: the plan changed
    assert kept_measured_choice(replace(pq, nlist=8192), sq, measured).kind == "ivfpq"  # the KB outgrew the lists
    assert kept_measured_choice(pq, pq, {"ivfpq nprobe=486": 0.97}) == pq
