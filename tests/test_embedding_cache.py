from pathlib import Path

import numpy as np
import polars as pl
import pytest

from storage import ArtifactStore
from storage.embedding_cache import EmbeddingCache


def test_vectors_are_written_a_chunk_at_a_time_so_a_crash_keeps_finished_chunks(tmp_path):
    store = ArtifactStore(tmp_path)
    shas = [f"s{i}" for i in range(10)]
    calls = []

    items = list(range(10))

    def crashes_on_third_chunk(batch):
        calls.append(list(batch))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return np.array([[float(p), 1.0] for p in batch], np.float32)

    with pytest.raises(RuntimeError):
        EmbeddingCache(store, "enc", "text", chunk=4).get_or_compute(shas, items, crashes_on_third_chunk)
    resumed = []

    def encode(batch):
        resumed.append(list(batch))
        return np.array([[float(p), 1.0] for p in batch], np.float32)

    vectors, fresh = EmbeddingCache(store, "enc", "text", chunk=4).get_or_compute(shas, items, encode)
    assert resumed == [[8, 9]] and fresh == 2  # the two finished chunks were kept
    assert vectors[:, 0].tolist() == [float(i) for i in range(10)]


def test_an_unreadable_cache_part_is_moved_aside_and_recomputed(tmp_path):
    store = ArtifactStore(tmp_path)
    cache = EmbeddingCache(store, "enc", "text")
    cache.get_or_compute(["a", "b"], ["a", "b"], lambda batch: np.ones((len(batch), 2), np.float32))
    part = next(Path(cache.folder).glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:20])
    vectors, fresh = EmbeddingCache(store, "enc", "text").get_or_compute(
        ["a", "b"], ["a", "b"], lambda batch: np.full((len(batch), 2), 2.0, np.float32)
    )
    assert fresh == 2 and vectors.tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert list((tmp_path / "_quarantine" / "_embedding_cache").iterdir())


def test_chunks_mapped_in_waves_come_back_in_order():
    import tempfile

    store = ArtifactStore(tempfile.mkdtemp())
    seen_waves = []

    def mapper(fn, batches):
        seen_waves.append(len(batches))
        return [fn(batch) for batch in reversed(batches)][::-1]  # computed out of order, returned in order

    shas = [f"s{i}" for i in range(7)]
    vectors, fresh = EmbeddingCache(store, "enc", "text", chunk=2).get_or_compute(
        shas, list(range(7)), lambda b: np.array([[float(i)] for i in b], np.float32), map_batches=mapper, wave=3
    )
    assert seen_waves == [3, 1] and fresh == 7 and vectors[:, 0].tolist() == [float(i) for i in range(7)]


def test_each_distinct_image_is_embedded_once_and_no_image_still_gives_a_table_of_the_encoder_width():
    from kgmel_core.retrieval.features import images_to_embed
    from kgmel_core.schemas import image_embeddings_table, text_embeddings_table

    mentions = pl.DataFrame({"image_sha256": ["a", None, "b"], "image_path": ["m/a.png", None, "m/b.png"]})
    entities = pl.DataFrame({"image_sha256": ["b", "c"], "image_path": ["kb/b.png", "kb/c.png"]})
    assert images_to_embed(mentions, entities).rows() == [("a", "m/a.png"), ("b", "m/b.png"), ("c", "kb/c.png")]
    table, schema = image_embeddings_table([], np.zeros((0, 4), np.float32))
    assert table.num_rows == 0 and schema.field("vector").type.list_size == 4
    table, schema = text_embeddings_table(["s1", "s2"], ["x", "y"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert table.cast(schema).column("vector").to_pylist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
