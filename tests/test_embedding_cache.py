import numpy as np
import pytest

from storage import ArtifactStore
from storage.embedding_cache import EmbeddingCache


def test_vectors_are_written_a_chunk_at_a_time_so_a_crash_keeps_finished_chunks(tmp_path):
    store = ArtifactStore(tmp_path)
    shas = [f"s{i}" for i in range(10)]
    calls = []

    def crashes_on_third_chunk(positions):
        calls.append(list(positions))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return np.array([[float(p), 1.0] for p in positions], np.float32)

    with pytest.raises(RuntimeError):
        EmbeddingCache(store, "enc", "text", chunk=4).get_or_compute(shas, crashes_on_third_chunk)
    resumed = []

    def encode(positions):
        resumed.append(list(positions))
        return np.array([[float(p), 1.0] for p in positions], np.float32)

    vectors, fresh = EmbeddingCache(store, "enc", "text", chunk=4).get_or_compute(shas, encode)
    assert resumed == [[8, 9]] and fresh == 2  # the two finished chunks were kept
    assert vectors[:, 0].tolist() == [float(i) for i in range(10)]


def test_an_unreadable_cache_part_is_moved_aside_and_recomputed(tmp_path):
    store = ArtifactStore(tmp_path)
    cache = EmbeddingCache(store, "enc", "text")
    cache.get_or_compute(["a", "b"], lambda pos: np.ones((len(pos), 2), np.float32))
    part = next(cache.folder.glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:20])
    vectors, fresh = EmbeddingCache(store, "enc", "text").get_or_compute(
        ["a", "b"], lambda pos: np.full((len(pos), 2), 2.0, np.float32)
    )
    assert fresh == 2 and vectors.tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert list((tmp_path / "_quarantine" / "_embedding_cache").iterdir())
