"""The pipeline on an IVF-PQ index that re-scores its shortlist: the served candidates are exact search's,
the index artifact records what it chose and the recall it measured, and a damaged vectors file is
never used to score."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import small_config

from flows.pipeline import full_pipeline
from kgmel_core.data.demo_data import DemoSpec, generate_demo_dataset
from storage import ArtifactStore
from tasks.index import VECTORS_FILE

pytestmark = pytest.mark.slow
IVFPQ = {"kind": "ivfpq", "nlist": 4, "nprobe": 4, "pq_m": 16, "rescore": 128, "rescore_dtype": "float32"}


@pytest.fixture(scope="module")
def large_kb_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("large_kb")
    generate_demo_dataset(root, DemoSpec(groups=12, distractors=320, seed=3))  # PQ trains 256 centroids
    return root


def _artifact(result, label):
    return ArtifactStore(result["root"]).require(*result["artifacts"][label].split("/"))


def test_a_rescoring_index_serves_exact_candidates_and_a_damaged_vectors_file_is_rebuilt(
    prefect_harness, large_kb_demo, tmp_path
):
    config = small_config(large_kb_demo, tmp_path / "artifacts", index=IVFPQ)
    result = full_pipeline(config)
    indexed = _artifact(result, "index")
    stats = indexed.manifest["stats"]
    assert (stats["kind"], stats["rescore"], stats["rescore_dtype"]) == ("ivfpq", 128, "float32")
    # all lists probed and the top 128 re-scored: exact but for ties (same-label demo entities can share a vector)
    assert stats["recall_queries"] == 200 and stats["recall_at_16_held"] >= 0.99

    entities = indexed.read("fused_entities")
    vectors = np.stack(entities["vector"].to_numpy())
    mentions = _artifact(result, "retrieve").read("fused_mentions")
    queries = np.stack(mentions["vector"].to_numpy())
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :8]
    served = _artifact(result, "retrieve").read("candidates").sort("mention_id", "rank")
    expected = pl.DataFrame({
        "mention_id": np.repeat(mentions["mention_id"].to_numpy(), 8),
        "rank": np.tile(np.arange(1, 9, dtype=np.int32), len(mentions)),
        "qid": entities["qid"].to_numpy()[exact.reshape(-1)],
    }).sort("mention_id", "rank")
    assert served.select("mention_id", "rank", "qid").equals(expected)

    path = indexed.file(VECTORS_FILE)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-4096])  # truncated in place, after it was published
    again = full_pipeline(config)
    rebuilt = _artifact(again, "index")
    assert rebuilt.key == indexed.key  # same inputs: rebuilt under its key, not trusted as it was
    assert rebuilt.file(VECTORS_FILE).stat().st_size == size
    runs = pl.read_parquet(f"{result['root']}/_runs/*.parquet").sort("finished_at")
    last = runs.filter(pl.col("run_id") == runs["run_id"][-1])
    index_run = last.filter(pl.col("stage") == "index")
    assert not index_run["cache_hit"][0] and "failed verification" in index_run["note"][0]
    assert _artifact(again, "retrieve").read("candidates").sort("mention_id", "rank").equals(served)
