"""Growing an index in place: which entities are new, when to append, and that an appended index and its
vectors file answer like the index built over all of them."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from test_index import _unit

from kgmel_core.config import IndexConfig
from kgmel_core.retrieval.growth import GrowthRule, KBChanges, coarse_distance, decide, entity_signatures, kb_changes
from kgmel_core.retrieval.index import (
    IndexPlan,
    append_vectors,
    build_index_from_shards,
    ivf_centroids,
    sample_rows,
    samples_of_rows,
    search,
)
from kgmel_core.retrieval.rescore import RescoredIndex, VectorsFileError, checked_layout, extend_vectors, write_rows

IVF = IndexPlan("ivfpq", 1024, 384, 96, 40960, 256)
RULE = GrowthRule(max_growth=0.25, max_drift=1.2)


def _kb(rows: dict[str, tuple], triples: list[tuple]) -> tuple[pl.DataFrame, pl.DataFrame]:
    entities = pl.DataFrame(
        [(qid, *fields) for qid, fields in rows.items()],
        schema=["qid", "label", "description", "image_path", "image_sha256"], orient="row",
    )
    kb_triples = pl.DataFrame(triples, schema=["head_qid", "relation", "relation_description", "tail",
                                                "tail_description"], orient="row")
    return entities, kb_triples


def _signatures(rows, triples):
    return entity_signatures(*_kb(rows, triples))


BASE = {"Q1": ("Paris", "capital", "/a/p.jpg", "s1"), "Q2": ("Rome", None, None, None)}
TRIPLES = [("Q1", "country", None, "France", ""), ("Q1", "mayor", None, "Hidalgo", ""), ("Q2", "country", None,
                                                                                           "Italy", "")]


def test_new_entities_are_added_in_kb_order_and_an_image_path_alone_is_no_change():
    after = {"Q3": ("Oslo", "", None, None), **{**BASE, "Q1": ("Paris", "capital", "/moved/p.jpg", "s1")},
             "Q0": ("Bern", "x", None, None)}
    changes = kb_changes(_signatures(BASE, TRIPLES), _signatures(after, TRIPLES))
    assert changes == KBChanges(added=["Q3", "Q0"], changed=0, removed=0)


@pytest.mark.parametrize("edit", [
    lambda rows, triples: ({**rows, "Q2": ("Rome", "", None, None)}, triples),  # null description -> empty
    lambda rows, triples: ({**rows, "Q1": ("Paris", "capital", "/a/p.jpg", "s9")}, triples),  # other image content
    lambda rows, triples: (rows, [triples[1], triples[0], triples[2]]),  # triples reordered: max_triples keeps others
    lambda rows, triples: (rows, [*triples[:2], ("Q2", "country", "", "Italy", "")]),  # relation description
    lambda rows, triples: (rows, triples[:1] + triples[2:]),  # a triple dropped
])
def test_anything_the_retriever_reads_marks_an_entity_changed(edit):
    rows, triples = edit(BASE, TRIPLES)
    changes = kb_changes(_signatures(BASE, TRIPLES), _signatures(rows, triples))
    assert (changes.added, changes.changed, changes.removed) == ([], 1, 0)


def test_a_removed_entity_is_counted():
    changes = kb_changes(_signatures(BASE, TRIPLES), _signatures({"Q1": BASE["Q1"]}, TRIPLES[:2]))
    assert (changes.added, changes.changed, changes.removed) == ([], 0, 1)


def test_decide_appends_only_pure_small_growth_of_the_same_plan():
    added = KBChanges([f"Q{i}" for i in range(100)], 0, 0)
    assert decide(IVF, IVF, added, 1000, 0, RULE).append
    assert decide(IVF, IVF, added, 1000, 0, RULE, drift=1.19).append
    reasons = {
        "changed": decide(IVF, IVF, KBChanges(added.added, 1, 0), 1000, 0, RULE),
        "removed": decide(IVF, IVF, KBChanges([], 0, 2), 1000, 0, RULE),
        "nlist=2048": decide(IVF, IndexPlan("ivfpq", 2048, 384, 96, 0, 256), added, 1000, 0, RULE),
        "flat": decide(IndexPlan("flat"), IVF, added, 1000, 0, RULE),
        "25%": decide(IVF, IVF, added, 1000, 200, RULE),  # 300 appended since the last build of 1,000
        "1.30x": decide(IVF, IVF, added, 1000, 0, RULE, drift=1.3),
    }
    for word, decision in reasons.items():
        assert not decision.append and word in decision.reason, (word, decision)
    assert not decide(IVF, IVF, added, 1000, 0, GrowthRule(0.0, 1.2)).append  # 0: always rebuild


def test_coarse_distance_is_the_mean_squared_distance_to_the_nearest_centroid():
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    vectors = np.array([[0.6, 0.8], [1.0, 0.0], [-1.0, 0.0]], np.float32)
    # nearest: (0,1) at 0.36+0.04=0.40; (1,0) at 0; (0,1) or (1,0) at 2.0 -> mean 2.4 / 3
    assert coarse_distance(centroids, vectors, block=2) == pytest.approx(0.8)


def test_sample_rows_draws_the_same_rows_whatever_the_sharding():
    rows = np.arange(40, dtype=np.float32).reshape(20, 2)
    whole = sample_rows([rows], 20, 5)
    assert len(whole) == 5 and (sample_rows([rows[:7], rows[7:]], 20, 5) == whole).all()
    # several samples in one pass: the first is what sample_rows draws alone; each stays in row order
    first, second = samples_of_rows([rows[:3], rows[3:]], 20, [5, 8])
    assert (first == whole).all() and len(second) == 8 and (np.diff(second[:, 0]) > 0).all()


def test_an_extended_vectors_file_is_the_copy_plus_the_new_rows(tmp_path):
    rng = np.random.default_rng(0)
    old, new = _unit(rng, 30, 8), _unit(rng, 5, 8)
    source = tmp_path / "old.npy"
    with open(source, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f2", "fortran_order": False, "shape": (30, 8)})
        write_rows(handle, old, "float16")
    target = tmp_path / "new.npy"
    with open(target, "wb") as handle:
        extend_vectors(source, handle, 30, 8, 5, "float16")
        write_rows(handle, new, "float16")
    checked_layout(target, 35, 8)  # header, size and shape of a 35-row file
    assert (np.load(target) == np.concatenate([old, new]).astype(np.float16)).all()
    with pytest.raises(VectorsFileError, match="float16 vectors, this index writes float32"):
        extend_vectors(source, io.BytesIO(), 30, 8, 5, "float32")
    with pytest.raises(VectorsFileError, match="30 x 8 vectors, the index 31 x 8"):
        extend_vectors(source, io.BytesIO(), 31, 8, 5, "float16")


def test_an_appended_ivfpq_index_re_scores_like_one_built_over_all_rows(tmp_path):
    rng = np.random.default_rng(1)
    kb, extra, queries = _unit(rng, 3000, 32), _unit(rng, 300, 32), _unit(rng, 40, 32)
    config = IndexConfig(kind="ivfpq", nlist=16, nprobe=16, pq_m=8, rescore=1500, rescore_dtype="float32")
    built = build_index_from_shards(lambda: iter([kb]), 3000, 32, config, vectors_path=tmp_path / "v.npy")
    assert ivf_centroids(built.index).shape == (16, 32) and ivf_centroids(built.index.quantizer) is None
    append_vectors(built.index, extra)
    assert built.index.ntotal == 3300 and built.index.nprobe == 16  # probing as before
    with open(tmp_path / "grown.npy", "wb") as handle:
        extend_vectors(tmp_path / "v.npy", handle, 3000, 32, 300, "float32")
        write_rows(handle, extra, "float32")
    everything = np.concatenate([kb, extra])
    exact = np.argsort(-(queries @ everything.T), axis=1, kind="stable")[:, :10]
    _, found = search(RescoredIndex(built.index, tmp_path / "grown.npy", 1500), queries, 10)
    assert (found == exact).all()  # all lists, a shortlist that covers the top-10: exact, appended rows included
    assert (found >= 3000).any()
