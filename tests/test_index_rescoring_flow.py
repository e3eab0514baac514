"""The pipeline on an IVF-PQ index that re-scores its shortlist: the served candidates are exact search's,
the index artifact records what it chose and the recall it measured, and a damaged vectors file is
never used to score."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from conftest import small_config

from flows.pipeline import full_pipeline, link, reindex_kb
from kgmel_core.data.demo_data import DemoSpec, generate_demo_dataset
from storage import ArtifactStore
from tasks.index import VECTORS_FILE

pytestmark = pytest.mark.slow
# auto past its threshold: IVF-PQ, kept after auto measures its held recall (an IVF-SQ switch: test_rescore.py)
IVFPQ = {"kind": "auto", "auto_threshold": 100, "nlist": 4, "nprobe": 4, "pq_m": 16, "rescore": 128,
         "rescore_dtype": "float32"}


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
    assert stats["auto_measured"] == {"ivfpq nprobe=4": stats["recall_at_16_held"]}

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


def _grown_copy(demo, target, new: dict[str, str], edit: dict[str, str] | None = None):
    """A copy of the demo dataset whose KB gained `new` (qid -> label), each with one triple, and whose
    entities in `edit` got another description."""
    shutil.copytree(demo, target)
    path = target / "kb" / "entities.json"
    entities = json.loads(path.read_text())
    for qid, description in (edit or {}).items():
        entities[qid]["description"] = description
    entities.update({qid: {"label": label, "description": f"{label}, a town"} for qid, label in new.items()})
    path.write_text(json.dumps(entities))
    with open(target / "kb" / "triples.tsv", "a") as handle:
        handle.writelines(f"{qid}\tcountry\tAtlantis\n" for qid in new)
    return target


def test_reindex_appends_the_entities_a_kb_gained_and_rebuilds_when_one_changed(
    prefect_harness, large_kb_demo, tmp_path
):
    config = small_config(large_kb_demo, tmp_path / "artifacts", index={**IVFPQ, "append_max_drift": 100.0})
    served = _artifact(full_pipeline(config), "index")
    before = served.read("fused_entities")
    new = {f"Q9{i:04d}": f"Newtown {i}" for i in range(12)}

    def reindexed(dataset):
        moved = config.model_copy(update={"dataset": config.dataset.model_copy(update={"path": str(dataset)})})
        return moved, reindex_kb(moved)

    grown_config, out = reindexed(_grown_copy(large_kb_demo, tmp_path / "grown", new))
    grown = _artifact(out, "index")
    growth = grown.manifest["stats"]["growth"]
    assert (growth["mode"], growth["added"], growth["previous"]) == ("append", 12, served.key)
    assert growth["appended_since_build"] == 12 and growth["built_rows"] == before.height
    fused = grown.read("fused_entities")
    assert fused.head(before.height).equals(before)  # the served rows, copied as they were
    assert fused["qid"].to_list()[before.height:] == list(new)
    assert grown.manifest["stats"]["entities"] == before.height + 12 == len(fused)
    assert grown.manifest["stats"]["auto_measured"] == served.manifest["stats"]["auto_measured"]  # what auto chose by

    # the appended index serves exact search's candidates (all lists probed, top 128 re-scored)
    records = [{"id": f"n{i}", "sentence": f"We drove to {label}.", "mention": [label]} for i, label in
               enumerate(list(new.values())[:3])]
    linked = link(grown_config, mentions=records)
    queries = np.stack(_artifact(linked, "retrieve").read("fused_mentions").sort("mention_id")["vector"].to_numpy())
    vectors = np.stack(fused["vector"].to_numpy())
    exact = fused["qid"].to_numpy()[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :8]]
    served_qids = linked["candidates"].sort("mention_id", "rank")["qid"].to_numpy().reshape(3, 8)
    assert (served_qids == exact).all() and set(served_qids[:, 0]) <= set(new)

    assert reindexed(tmp_path / "grown")[1]["artifacts"]["index"] == f"index/{grown.key}"  # nothing new: kept

    qid = before["qid"][0]
    _, again = reindexed(_grown_copy(large_kb_demo, tmp_path / "edited", new, edit={qid: "something else now"}))
    rebuilt = _artifact(again, "index").manifest["stats"]["growth"]
    assert rebuilt["mode"] == "rebuild" and "1 entities changed" in rebuilt["reason"]
    assert (rebuilt["previous"], rebuilt["appended_since_build"]) == (grown.key, 0)
