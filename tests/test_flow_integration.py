"""The real flows, end to end, on the small demo dataset (Prefect's test harness, no server)."""

import polars as pl
import pytest
from conftest import small_config

from flows.pipeline import full_pipeline, kgmel
from kgmel_core.retrieval import training
from storage import ArtifactStore, Catalog
from tasks.common import StageFailed

pytestmark = pytest.mark.slow
STAGES = ["ingest", "clip_bootstrap", "embed", "train", "index", "retrieve", "evaluate", "fit_nil"]


def _tables(root, ids):
    store = ArtifactStore(root)
    out = {}
    for label, artifact_id in ids.items():
        stage, key = artifact_id.split("/")
        artifact = store.require(stage, key)
        for table in artifact.manifest["tables"]:
            out[(label, table)] = artifact.read(table)
    return out


@pytest.fixture(scope="module")
def first_run(prefect_harness, small_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    config = small_config(small_demo, root)
    return config, full_pipeline(config)


def test_full_pipeline_writes_every_stage_and_catalog(first_run):
    config, result = first_run
    assert list(result["artifacts"]) == STAGES
    with Catalog(ArtifactStore(config.artifacts)).connect() as con:
        n_mentions = con.execute("select count(*) from mentions").fetchone()[0]
        per_mention = con.execute("select count(distinct mention_id), max(rank) from candidates").fetchone()
        methods = {r[0] for r in con.execute("select distinct method from metrics").fetchall()}
        built = con.execute("select count(*) from runs where not cache_hit").fetchone()[0]
    assert per_mention == (n_mentions, config.index.top_k)
    assert methods == {"kgmel", "kgmel (exact search, diagnostic)", "zero-shot text", "zero-shot names",
                       "zero-shot text + names", "zero-shot image"}
    assert built == len(STAGES)
    assert "| train |" in result["report"].markdown()


def test_rerun_skips_every_stage_by_key(first_run, prefect_harness):
    config, result = first_run
    again = full_pipeline(config)
    assert again["artifacts"] == result["artifacts"]
    runs = pl.read_parquet(f"{config.artifacts}/_runs/*.parquet")
    latest = runs.filter(pl.col("finished_at") == runs["finished_at"].max())
    assert latest["cache_hit"].all()


def test_crash_in_middle_stage_then_restart_matches_uninterrupted_run(
    first_run, prefect_harness, small_demo, tmp_path, monkeypatch
):
    _, reference = first_run
    config = small_config(small_demo, tmp_path / "crashy")
    real_train = training.train_retriever

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(training, "train_retriever", crash)
    with pytest.raises(StageFailed, match=r"stage 'train' \(artifact key [0-9a-f]+\) failed: RuntimeError: killed"):
        full_pipeline(config)
    store = ArtifactStore(config.artifacts)
    assert store.keys("train") == [] and len(store.keys("embed")) == 1
    monkeypatch.setattr(training, "train_retriever", real_train)
    resumed = full_pipeline(config)
    runs = pl.read_parquet(f"{config.artifacts}/_runs/*.parquet").sort("finished_at")
    last_run = runs.filter(pl.col("run_id") == runs["run_id"][-1])
    hits = dict(zip(last_run["stage"], last_run["cache_hit"], strict=True))
    assert hits["ingest"] and hits["clip_bootstrap"] and hits["embed"]  # earlier stages skipped by key
    assert not hits["train"]
    assert resumed["artifacts"] == reference["artifacts"]  # same keys as the uninterrupted run ...
    first, second = _tables(reference["root"], reference["artifacts"]), _tables(config.artifacts, resumed["artifacts"])
    for name, table in first.items():  # ... and identical tables (wall-clock columns aside)
        assert table.drop("seconds", strict=False).equals(second[name].drop("seconds", strict=False)), name


def test_entry_flow_validates_config_before_work(prefect_harness, tmp_path):
    with pytest.raises(Exception, match="top_k"):
        kgmel(job="full-pipeline", overrides={"artifacts": str(tmp_path), "index": {"top_k": 0}})
    assert not (tmp_path / "ingest").exists()


def test_reindex_embeds_only_changed_kb_rows_and_keeps_the_retriever(first_run, prefect_harness, tmp_path):
    import json
    import shutil

    from flows.pipeline import reindex_kb

    config, result = first_run
    dataset = tmp_path / "dataset"
    shutil.copytree(config.dataset.path, dataset)
    entities = json.loads((dataset / "kb" / "entities.json").read_text())
    entities["Q99999"] = {"label": "Newtown", "description": "a city founded yesterday"}
    (dataset / "kb" / "entities.json").write_text(json.dumps(entities))
    with open(dataset / "kb" / "triples.tsv", "a") as handle:
        handle.write("Q99999\tcountry\tAtlantis\n")
    moved = config.model_copy(update={"dataset": config.dataset.model_copy(update={"path": str(dataset)})})
    out = reindex_kb(moved)
    store = ArtifactStore(config.artifacts)
    assert out["artifacts"]["train"] == result["artifacts"]["train"]  # no retraining
    embed_stats = store.require(*out["artifacts"]["embed"].split("/")).manifest["stats"]
    # new: the entity head text, its label (the name view) and the tail "Atlantis" (plus the absolute image
    # paths moved: images are keyed by content, so none of them is re-encoded)
    assert embed_stats["texts_encoded_now"] == 3 and embed_stats["images_encoded_now"] == 0
    indexed = store.require(*out["artifacts"]["index"].split("/"))
    assert indexed.read("fused_entities")["qid"].to_list()[-1] == "Q99999"
    growth = indexed.manifest["stats"]["growth"]  # a flat index grows exactly: appended, never rebuilt
    assert (growth["mode"], growth["added"], growth["changed"], growth["removed"]) == ("append", 1, 0, 0)


def test_link_new_mentions_against_existing_index(first_run, prefect_harness, tmp_path):
    from flows.pipeline import link

    config, _ = first_run
    records = [{"id": "n1", "sentence": "A photo of Newtown.", "mention": ["Newtown"]}]
    out = link(config, mentions=records)
    candidates = out["candidates"]
    assert candidates["mention_id"].unique().to_list() == ["n1-0"]
    assert candidates.height == config.index.top_k and candidates["rank"].to_list() == list(range(1, 9))


def test_transient_failure_is_retried_by_prefect_and_a_bug_is_not(prefect_harness, small_demo, tmp_path, monkeypatch):
    config = small_config(small_demo, tmp_path / "retry")
    real_train = training.train_retriever
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train_retriever", flaky)
    full_pipeline(config)
    assert len(calls) == 2  # failed once, retried, succeeded
    runs = pl.read_parquet(f"{config.artifacts}/_runs/*.parquet")
    assert runs.filter(pl.col("stage") == "train")["status"].to_list() == ["failed", "ok"]


def _last_run_hits(artifacts) -> dict[str, bool]:
    runs = pl.read_parquet(f"{artifacts}/_runs/*.parquet").sort("finished_at")
    last = runs.filter(pl.col("run_id") == runs["run_id"][-1])
    return dict(zip(last["stage"], last["cache_hit"], strict=True))


def test_changed_config_rebuilds_only_the_affected_stages_and_force_rebuilds(first_run, prefect_harness):
    config, result = first_run
    changed = config.model_copy(update={"training": config.training.model_copy(update={"epochs": 3})})
    out = full_pipeline(changed)
    hits = _last_run_hits(config.artifacts)
    assert hits["ingest"] and hits["clip_bootstrap"] and hits["embed"]
    assert not hits["train"] and out["artifacts"]["train"] != result["artifacts"]["train"]
    forced = full_pipeline(config.model_copy(update={"force_stages": ["evaluate"]}))
    hits = _last_run_hits(config.artifacts)
    assert not hits["evaluate"] and all(v for k, v in hits.items() if k != "evaluate")
    assert forced["artifacts"] == result["artifacts"]  # same inputs, same key, replaced in place


def test_an_embed_stage_whose_strings_are_all_cached_loads_no_encoder(first_run, prefect_harness, tmp_path,
                                                                      monkeypatch):
    """The dataset moved (new paths, so the ingest and embed keys change) but no string or image is new:
    the vectors come from the cache by the encoder's identity, and no model is loaded to learn it."""
    import shutil

    import kgmel_core.factory
    from flows.pipeline import reindex_kb

    def refuse(spec):
        raise AssertionError(f"an encoder was loaded ({spec}) though every string was cached")

    config, result = first_run
    shutil.copytree(config.dataset.path, tmp_path / "dataset")
    moved = config.model_copy(update={"dataset": config.dataset.model_copy(update={"path": str(tmp_path / "dataset")})})
    monkeypatch.setattr(kgmel_core.factory, "create_encoder", refuse)
    monkeypatch.setattr("tasks.embed.create_encoder", refuse)
    out = reindex_kb(moved)
    assert out["artifacts"]["embed"] != result["artifacts"]["embed"]  # really embedded again, not a cache hit
    stats = ArtifactStore(config.artifacts).require(*out["artifacts"]["embed"].split("/")).manifest["stats"]
    assert stats["texts_encoded_now"] == 0 and stats["images_encoded_now"] == 0
