"""Fault injection against the artifact lineage, grouped by the guarantee under test: what is served,
what a key covers, what is trusted, what survives failures, what queries may do. Corrupt, truncate,
bit-flip, delete, garbage manifests, temp leftovers, outages, hostile paths, write attempts through
`query`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import small_config
from fake_llm import FakeLLM, install

from flows.pipeline import ServedModelMismatch, ablations, full_pipeline, link, reindex_kb
from kgmel_core.data.datasets import DatasetError, DatasetLayout, read_dataset
from kgmel_core.data.demo_data import DemoSpec, generate_demo_dataset
from kgmel_core.retrieval import training
from storage import ArtifactStore, Catalog, QueryRefused, RegistryError
from tasks import common
from tasks import index as index_task

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _artifact(result, label):
    return ArtifactStore(result["root"]).require(*result["artifacts"][label].split("/"))


def _last_run(artifacts) -> pl.DataFrame:
    runs = pl.read_parquet(f"{artifacts}/_runs/*.parquet").sort("finished_at")
    return runs.filter(pl.col("run_id") == runs["run_id"][-1])


def _hits(artifacts) -> dict[str, bool]:
    last = _last_run(artifacts)
    return dict(zip(last["stage"], last["cache_hit"], strict=True))


@pytest.fixture(scope="module")
def served(prefect_harness, small_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    config = small_config(small_demo, root / "artifacts")
    return config, full_pipeline(config)


# Wrong model served ------------------------------------------------------------------------------


def test_reindex_and_link_serve_the_promoted_model_after_ablations_and_another_dataset(
    served, tmp_path_factory
):
    config, first = served
    v1_train = first["artifacts"]["train"].split("/")[1]
    ablations(config)  # newer train/index artifacts ("w/o gate" last): never registered, never served
    other_data = tmp_path_factory.mktemp("other-data")
    generate_demo_dataset(other_data, DemoSpec(groups=8, distractors=4, seed=5))
    other = config.model_copy(
        update={"dataset": config.dataset.model_copy(update={"path": str(other_data), "name": "other"})}
    )
    full_pipeline(other)  # another dataset on the same root: its own model name
    retrained = config.model_copy(update={"training": config.training.model_copy(update={"epochs": 3})})
    v2 = full_pipeline(retrained)  # a newer model under the same name: registered, not served
    assert "v2; served: v1" in v2["model"]

    reindexed = reindex_kb(config)
    assert reindexed["artifacts"]["train"] == f"train/{v1_train}"
    linked = link(config, mentions=[{"id": "n", "sentence": "A city.", "mention": ["Springfield"]}])
    assert linked["artifacts"]["index"] == reindexed["artifacts"]["index"]
    store = ArtifactStore(config.artifacts)
    assert store.input(_artifact(linked, "index"), "train").key == v1_train

    registry = store.models
    assert registry.require("other").serving.train != v1_train
    registry.promote(config.model, 2)
    assert reindex_kb(config)["artifacts"]["train"] == v2["artifacts"]["train"]
    registry.promote(config.model, 1)  # leave v1 served for the other tests of this module


def test_an_unknown_model_name_is_an_error_naming_the_known_ones(served):
    config, _ = served
    with pytest.raises(RegistryError, match=r"no model named 'nope'.*models: .*small-demo"):
        reindex_kb(config, model="nope")


def test_registry_serves_the_first_version_until_another_is_promoted_and_keeps_the_history(tmp_path):
    registry = ArtifactStore(tmp_path).models
    registry.register("m", "train-a", "index-a")
    registry.register("m", "train-a", "index-a")  # the same model again: no new version
    registry.register("m", "train-b", "index-b")
    state = registry.require("m")
    assert [(v.number, v.train) for v in state.versions] == [(1, "train-a"), (2, "train-b")]
    assert state.serving.train == "train-a"
    registry.record_reindex("m", "train-a", "index-a2")
    assert registry.require("m").serving.index == "index-a2"
    assert registry.promote("m", "v2").train == "train-b"
    assert registry.require("m").serving.index == "index-b"
    with pytest.raises(RegistryError, match=r"no version '7'; versions: v1 \(train train-a\), v2 .*served"):
        registry.promote("m", 7)
    assert [e["event"] for e in registry.history("m")] == ["register", "register", "reindex", "promote"]


# Settings drift --------------------------------------------------------------------------------


def test_reindex_refuses_a_config_that_contradicts_the_served_models_encoder(served):
    config, _ = served
    drifted = config.model_copy(
        update={"encoder": config.encoder.model_copy(update={"mention_text": "mention_only"})}
    )
    drifted.encoder.model_fields_set.add("mention_text")
    with pytest.raises(ServedModelMismatch, match=r"encoder.mention_text: the config says 'mention_only'"):
        reindex_kb(drifted)


def test_link_encodes_mentions_with_the_served_models_settings_not_the_defaults(served):
    config, _ = served
    from kgmel_core.config import load_config

    bare = load_config(None, {"artifacts": config.artifacts, "dataset": config.dataset.model_dump(),
                              "index": {"top_k": 8}, "generation": {"enabled": False},
                              "rerank": {"enabled": False, "candidates": 8}})
    assert bare.encoder.text_encoder == "open_clip"  # the default, never written by the user
    out = link(bare, mentions=[{"id": "n", "sentence": "A photo.", "mention": ["Springfield"]}])
    embedded = _artifact(out, "embed")
    assert embedded.manifest["config"]["text_encoder"] == "minilm"  # what the model was trained with


# Code is in the key ---------------------------------------------------------------------------


def _digest_in_copy(tmp_path: Path, module: str) -> str:
    code = f"from storage.code_identity import code_digest; print(code_digest({module!r}))"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_code_digest_follows_the_code_a_stage_imports_and_ignores_docstrings(tmp_path):
    for package in ("kgmel_core", "tasks"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    train0, generate0 = _digest_in_copy(tmp_path, "tasks.train"), _digest_in_copy(tmp_path, "tasks.generate")
    model = tmp_path / "kgmel_core" / "retrieval" / "model.py"
    source = model.read_text().replace('"""The KGMEL retriever', '"""The (reworded) KGMEL retriever')
    assert "nn.LeakyReLU()" in source
    model.write_text(source.replace("nn.LeakyReLU()", "nn.LeakyReLU(\n)") + "\n\n# a comment\n")
    assert _digest_in_copy(tmp_path, "tasks.train") == train0  # docstring, comment and line breaks only
    model.write_text(model.read_text().replace("nn.LeakyReLU(\n)", "nn.GELU()"))
    train1 = _digest_in_copy(tmp_path, "tasks.train")
    assert train1 != train0  # a fix to the model rebuilds train ...
    assert _digest_in_copy(tmp_path, "tasks.generate") == generate0  # ... and not stage 1


def test_a_code_change_rebuilds_its_stage_and_what_follows(served, monkeypatch):
    config, first = served
    real = common.code_digest
    monkeypatch.setattr(common, "code_digest", lambda m: real(m) + ("-fixed" if m == "tasks.train" else ""))
    again = full_pipeline(config)
    hits = _hits(config.artifacts)
    assert hits["ingest"] and hits["embed"] and not hits["train"]
    assert again["artifacts"]["train"] != first["artifacts"]["train"]


# Forced rebuilds propagate by content ------------------------------------------------------------


def test_forced_rebuild_with_other_content_gives_later_stages_new_keys(prefect_harness, small_demo, tmp_path,
                                                                       monkeypatch):
    config = small_config(small_demo, tmp_path / "artifacts")
    first = full_pipeline(config)
    forced = config.model_copy(update={"force_stages": ["train"]})
    same = full_pipeline(forced)  # deterministic: same bytes, same digest, later keys unchanged
    assert same["artifacts"] == first["artifacts"]
    real = training.train_retriever

    def other_numerics(model, *args, **kwargs):  # e.g. a GPU run: same config, other weights
        result = real(model, *args, **kwargs)
        with torch.no_grad():  # the task saves the model train_retriever leaves behind
            for weight in model.parameters():
                weight.add_(1e-3)
        return result

    monkeypatch.setattr(training, "train_retriever", other_numerics)
    changed = full_pipeline(forced)
    assert changed["artifacts"]["train"] == first["artifacts"]["train"]  # replaced in place ...
    for stage in ("index", "retrieve", "evaluate"):  # ... and what was built from it follows its content
        assert changed["artifacts"][stage] != first["artifacts"][stage], stage


# Damaged artifacts are never trusted ------------------------------------------------------------


def _store_with_table(tmp_path, rows=200):
    store = ArtifactStore(tmp_path)
    with store.writer("retrieve", "k", code="c", config={}, inputs={}) as writer:
        writer.write_table("candidates", pl.DataFrame({"qid": [f"Q{i}" for i in range(rows)], "rank": range(rows)}))
    artifact = store.require("retrieve", "k")
    return store, Path(artifact.parts("candidates")[0])


def test_truncated_part_is_not_trusted(tmp_path):
    store, part = _store_with_table(tmp_path)
    part.write_bytes(part.read_bytes()[:-40])
    assert store.get("retrieve", "k") is None


def test_bit_flipped_part_is_not_trusted_and_a_read_names_the_file(tmp_path):
    store, part = _store_with_table(tmp_path)
    artifact = store.require("retrieve", "k")
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x40
    part.write_bytes(bytes(data))
    assert store.get("retrieve", "k") is None
    with pytest.raises(Exception, match=str(part)):
        artifact.read("candidates")  # a handle obtained before the damage: the error names the file


def test_part_overwritten_with_other_valid_rows_is_not_trusted(tmp_path):
    store, part = _store_with_table(tmp_path)
    pl.DataFrame({"qid": [f"Q{i}" for i in range(1, 201)], "rank": range(200)}).write_parquet(part)
    assert store.get("retrieve", "k") is None


def test_damaged_artifact_is_rebuilt_by_the_next_run_and_quarantined(served):
    config, first = served
    candidates = _artifact(first, "retrieve").parts("candidates")[0]
    other = pl.read_parquet(candidates).with_columns(pl.col("qid").shift(1, fill_value="Q1"))
    other.write_parquet(candidates)
    again = full_pipeline(config)
    hits = _hits(config.artifacts)
    assert not hits["retrieve"] and hits["index"]
    assert again["artifacts"]["retrieve"] == first["artifacts"]["retrieve"]  # same inputs, same key, rebuilt
    assert again["artifacts"]["evaluate"] == first["artifacts"]["evaluate"]  # same content again: same digest
    quarantined = list((Path(config.artifacts) / "_quarantine" / "retrieve").iterdir())
    assert quarantined and "replaced by a rebuild" in (quarantined[0] / "QUARANTINED.txt").read_text()


# Damage elsewhere is not fatal; unfinished folders are invisible ---------------------------


def test_garbage_manifest_truncated_part_and_temp_leftovers_do_not_break_a_run(served):
    config, first = served
    root = Path(config.artifacts)
    (root / "evaluate" / "deadbeef").mkdir()
    (root / "evaluate" / "deadbeef" / "manifest.json").write_text("{not json")
    tmp = root / "evaluate" / ".tmp-cafe-1234" / "metrics"
    tmp.mkdir(parents=True)
    (tmp / "part-0.parquet").write_bytes(b"PAR1 half written")
    train_history = Path(_artifact(first, "train").parts("training_history")[0])
    train_history.write_bytes(train_history.read_bytes()[:10])
    full_pipeline(config)  # ingest onwards runs; train is rebuilt
    assert not _hits(config.artifacts)["train"]
    catalog = Catalog(ArtifactStore(root))
    keys = catalog.query("select distinct artifact_key from metrics_all")["artifact_key"].to_list()
    assert keys and not any(k.startswith(".tmp") or k == "deadbeef" for k in keys)
    assert "deadbeef" not in catalog.query("select key from manifests")["key"].to_list()


# Every stage outcome reaches the run log, interruptions and failures on a full disk included --------


def _stage_ctx(tmp_path):
    from storage import RunLog

    store = ArtifactStore(tmp_path / "artifacts")
    return common.PipelineContext(store, RunLog(store, "run-1", "test"))


def test_an_interrupted_stage_is_recorded_and_the_interruption_propagates(tmp_path):
    ctx = _stage_ctx(tmp_path)

    def build(writer):
        raise KeyboardInterrupt  # what SIGINT raises; Prefect's SIGTERM handler raises a BaseException too

    with pytest.raises(KeyboardInterrupt):
        common.run_stage(ctx, "embed", {}, {}, build)
    runs = pl.read_parquet(tmp_path / "artifacts" / "_runs" / "run-1.parquet")
    assert runs.select("stage", "status", "error").rows() == [("embed", "interrupted", "KeyboardInterrupt")]
    assert ctx.store.keys("embed") == []  # and nothing half-written was published


def test_a_failure_whose_record_cannot_be_written_still_raises_its_own_error(tmp_path, monkeypatch):
    import errno

    ctx = _stage_ctx(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ctx.store.fsx, "write_parquet_atomic", disk_full)

    def build(writer):
        raise ValueError("record 3: field 'answer' is not a QID")

    with pytest.raises(common.StageFailed, match="ValueError: record 3: field 'answer' is not a QID"):
        common.run_stage(ctx, "ingest", {}, {}, build)
    assert [(r.stage, r.status) for r in ctx.run_log.records] == [("ingest", "failed")]  # kept for the summary


def test_sigterm_ends_the_run_stops_its_temporary_server_and_logs_the_stage(small_demo, tmp_path):
    """Prefect re-sends SIGTERM to the handler it found; with the default one the process died without
    its atexit hooks, and the temporary server (uvicorn) outlived the run."""
    import re
    import signal
    import socket
    import time

    import yaml

    endless = small_config(small_demo, tmp_path / "artifacts", training={"epochs": 100_000, "patience": 100_000})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(endless.model_dump(mode="json")))
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", "run.yaml"], cwd=tmp_path,
                               stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while "stage train: building" not in log.read_text() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert run.poll() is None, log.read_text()[-3000:]
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 128 + signal.SIGTERM
    port = int(re.search(r"temporary server on http://127.0.0.1:(\d+)", log.read_text()).group(1))
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing answers there any more
    runs = pl.read_parquet(tmp_path / "artifacts" / "_runs" / "*.parquet")
    assert runs.filter(pl.col("stage") == "train").select("status", "error").rows() == [
        ("interrupted", "TerminationSignal")
    ]


# LLM failures are re-attempted, bounded, and say why -----------------------------------------


LLM = {"model": "fake/model", "timeout_s": 3, "retries": 0, "backoff_s": 0.0, "concurrency": 8}


def test_outage_then_recovery_recalls_the_failed_calls_within_the_attempt_bound(prefect_harness, small_demo, tmp_path):
    llm = {**LLM, "max_stage_attempts": 2}
    config = small_config(small_demo, tmp_path / "artifacts", generation={"enabled": True, "llm": llm})
    install(FakeLLM(failure_rate=0.5, timeout_rate=0.5))  # an outage: errors and hangs
    first = full_pipeline(config)
    calls = _artifact(first, "generate").read("llm_calls")
    assert (calls["status"] != "ok").all()
    assert calls.filter(pl.col("status") == "timeout")["error"].str.contains("timeout_s=3").all()  # not empty
    still_down = FakeLLM(failure_rate=1.0)
    install(still_down)
    full_pipeline(config)  # attempt 2 of 2: every failed call is tried again
    assert still_down.calls == calls.height
    full_pipeline(config)  # the bound is reached: the artifact stands, nobody is called
    assert still_down.calls == calls.height
    recovered = FakeLLM()
    install(recovered)
    full_pipeline(config.model_copy(update={"force_stages": ["generate"]}))
    assert recovered.calls == calls.height


# Queries are read-only ----------------------------------------------------------------------------


def test_query_cannot_write_artifacts_or_read_outside_the_store(served):
    config, first = served
    catalog = Catalog(ArtifactStore(config.artifacts))
    target = Path(_artifact(first, "retrieve").parts("candidates")[0])
    before = target.read_bytes()
    with pytest.raises(QueryRefused, match="COPY"):
        catalog.query(f"copy (select 1 as x) to '{target}'")
    for statement in ("attach 'x.db'", "export database '/tmp/x'", "set enable_external_access = true",
                      "create table t as select 1"):
        with pytest.raises(QueryRefused):
            catalog.query(statement)
    with pytest.raises(Exception, match="(?i)permission"):
        catalog.query("select * from read_text('/etc/hostname')")
    assert target.read_bytes() == before
    assert catalog.query("select count(*) as n from candidates")["n"][0] > 0

    from flows.cli import main

    assert main(["query", f"copy (select 1) to '{target}'", "--artifacts", str(config.artifacts)]) == 2


# Paths stay inside their folder; odd characters in the root are harmless ------------------------


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "link-out.png"])
def test_image_paths_outside_their_folder_stop_ingest_naming_record_and_field(tmp_path, name):
    (tmp_path / "mention_images").mkdir()
    (tmp_path / "mention_images" / "link-out.png").symlink_to("/etc/passwd")
    record = {"id": 1, "sentence": "Obama spoke.", "mention": ["Obama"], "entity": ["B"], "answer": ["Q76"],
              "imgPath": name}
    (tmp_path / "Mini.json").write_text(json.dumps([record]))
    (tmp_path / "splits.json").write_text(json.dumps({"train": [1]}))
    with pytest.raises(DatasetError, match=r"record 0 \(id=1\): field 'imgPath'.*outside the image folder"):
        read_dataset(DatasetLayout(tmp_path))


def test_glob_characters_in_the_artifact_root_are_harmless(prefect_harness, small_demo, tmp_path):
    config = small_config(small_demo, tmp_path / "odd [root]? *")
    first = full_pipeline(config)
    assert full_pipeline(config)["artifacts"] == first["artifacts"]
    assert Catalog(ArtifactStore(config.artifacts)).query("select count(*) as n from candidates")["n"][0] > 0


# Catalog updates survive a lock held elsewhere ----------------------------------------------------


def test_catalog_refresh_waits_for_a_lock_held_by_another_process(served):
    config, _ = served
    catalog = Catalog(ArtifactStore(config.artifacts))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=True); "
         "print('locked', flush=True); time.sleep(1.5)", str(catalog.path)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    assert catalog.refresh(attempts=6)
    assert catalog.refresh_attempts > 1  # it waited for the lock instead of giving up
    holder.wait(timeout=30)


def test_a_query_never_locks_the_catalog_file(served):
    config, _ = served
    catalog = Catalog(ArtifactStore(config.artifacts))
    with catalog.query_connection() as con:
        con.sql("select count(*) from candidates").fetchall()
        assert catalog.refresh(attempts=1)


# Headline metrics are what was served ------------------------------------------------------------


def test_headline_hits_come_from_served_candidates_not_exact_search(prefect_harness, small_demo, tmp_path,
                                                                     monkeypatch):
    real_search = index_task.search

    def lossy_search(index, queries, k):  # an approximate index that ranks its results badly
        scores, ids = real_search(index, queries, k)
        return scores[:, ::-1].copy(), ids[:, ::-1].copy()

    monkeypatch.setattr(index_task, "search", lossy_search)
    config = small_config(small_demo, tmp_path / "artifacts")
    result = full_pipeline(config)
    metrics = _artifact(result, "evaluate").read("metrics")
    candidates = _artifact(result, "retrieve").read("candidates")
    mentions = _artifact(result, "ingest").read("mentions")
    top1 = candidates.filter(pl.col("rank") == 1).join(mentions, on="mention_id")
    for split, group in top1.group_by("split"):
        served_hits1 = 100 * (group["qid"] == group["gold_qid"]).mean()
        value = metrics.filter(
            (pl.col("method") == "kgmel") & (pl.col("split") == split[0]) & (pl.col("metric") == "hits@1")
        )["value"][0]
        assert value == pytest.approx(served_hits1)
    exact = metrics.filter((pl.col("method") == "kgmel (exact search, diagnostic)") & (pl.col("metric") == "hits@1"))
    served_all = metrics.filter((pl.col("method") == "kgmel") & (pl.col("metric") == "hits@1"))
    assert exact["value"].sum() > served_all["value"].sum()
