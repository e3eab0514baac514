"""The benchmark flow on the small demo dataset: variants share ingest/embed, the table comes from the
served candidates, and the plots are real PNG files inside the artifact."""

import polars as pl
import pytest
from conftest import small_config

from flows.benchmark import benchmark
from kgmel_core.variants import VARIANTS, missing
from storage import ArtifactStore

pytestmark = pytest.mark.slow
CHOSEN = ["kgmel", "kgmel w/o triples", "kgmel, label-only entities"]


def test_benchmark_writes_a_table_and_plots_and_reuses_shared_stages(prefect_harness, small_demo, tmp_path):
    config = small_config(small_demo, tmp_path / "artifacts", nil={"share": 0.3})  # 14 val mentions: 5 made NIL
    result = benchmark(config, variants=CHOSEN)
    store = ArtifactStore(result["root"])
    artifact = store.require(*result["benchmark"].split("/"))
    table = artifact.read("benchmark")
    methods = set(table["method"])
    zero_shot = {"zero-shot text", "zero-shot names", "zero-shot text + names", "zero-shot text (label-only entities)",
                 "zero-shot text + names (label-only entities)"}
    assert methods == zero_shot | set(CHOSEN) | {f"{label}, out-of-KB" for label in CHOSEN}
    nil = dict(table.filter(pl.col("method") == "kgmel, out-of-KB").select("metric", "value").iter_rows())
    assert nil["nil_mentions"] == 5 and nil["n"] == 14 and 0 <= nil["nil_f1"] <= 1
    assert set(table["split"]) == {"val"}
    hits1 = dict(table.filter(pl.col("metric") == "hits@1").select("method", "value").iter_rows())
    evaluated = {a.manifest["config"]["label"]: a for a in store.artifacts("evaluate")}
    served = evaluated["kgmel"].read("metrics").filter(
        (pl.col("method") == "kgmel") & (pl.col("split") == "val") & (pl.col("metric") == "hits@1")
    )["value"][0]
    assert hits1["kgmel"] == served  # the benchmark repeats what evaluate measured on served candidates
    assert table.filter(pl.col("metric") == "train_s")["value"].min() > 0
    for name in ("training_curves.png", "hits_at_k.png", "nil_precision_recall.png"):
        data = artifact.file(name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert len(store.keys("ingest")) == 1 and len(store.keys("embed")) == 2  # label-only embeds its own heads
    assert "hits@1" in result["report"].markdown() and "training_curves.png" in result["report"].markdown()


def test_variants_that_would_repeat_another_are_skipped_with_a_reason():
    no_triples = VARIANTS["kgmel w/o triples"]
    assert "no triples" in missing(no_triples, {"descriptions"})
    assert missing(no_triples, {"triples", "descriptions"}) is None
    label_only = VARIANTS["kgmel, label-only entities"]
    assert "no descriptions" in missing(label_only, {"triples"})
    assert "no triples" in missing(VARIANTS["kgmel + reranker w/o KB facts"], {"descriptions"})
