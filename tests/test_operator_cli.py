"""The operator's view (issue "Operator experience"): the `kgmel` CLI validates before Prefect starts,
`link` runs the LLM on the mentions it was given, views stay joinable after a link run, and the README's
query examples run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_llm import FakeLLM, install

from flows.cli import main
from storage import ArtifactStore, Catalog

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KGMEL = [sys.executable, "-m", "flows.cli"]
LLM = {"model": "fake/model", "timeout_s": 2, "retries": 0, "backoff_s": 0.0, "concurrency": 4}


@pytest.fixture(scope="module")
def linked(prefect_harness, small_demo, tmp_path_factory):
    """A demo-like store: full-pipeline with LLM stages scoped to 5 test mentions, then `kgmel link`."""
    folder = tmp_path_factory.mktemp("operator")
    config = {
        "dataset": {"path": str(small_demo), "name": "small"},
        "artifacts": str(folder / "artifacts"),
        "encoder": {"text_encoder": "minilm", "clip_model": "kgmel-tiny-clip", "clip_pretrained": "train-on-dataset",
                    "bootstrap_epochs": 2, "batch_size": 64},
        "retriever": {"hidden_dim": 32, "top_p": 3, "use_mention_triples": False},
        "training": {"epochs": 3, "batch_size": 32},
        "index": {"top_k": 8},
        "generation": {"llm": LLM, "scope": {"splits": ["test"], "max_mentions": 5}},
        "rerank": {"method": "llm", "llm": LLM, "candidates": 4, "filter_n": 2, "margin_threshold": None,
                   "scope": {"splits": ["test"], "max_mentions": 5}},
        "nil": {"share": 0.3},  # 14 val mentions: enough NIL ones to evaluate out of fold (`nil_outcomes`)
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    new = [{"id": "new1", "sentence": "A photo taken in Peru last year.", "mention": ["Peru"]},
           {"id": "new2", "sentence": "The river flooded the valley.", "mention": ["river"]}]
    (folder / "new.json").write_text(json.dumps(new))
    fake = FakeLLM()
    install(fake)
    assert main(["run", "--config", str(folder / "config.yaml")]) == 0
    before = fake.calls
    assert main(["link", str(folder / "new.json"), "--config", str(folder / "config.yaml")]) == 0
    return folder, fake.calls - before


def test_bad_arguments_fail_before_any_server_starts():
    for argv, message in (
        (["run", "--job", "nope"], "is not one of"),
        (["link", "/no/such/file.json"], "does not exist"),
        (["run", "--config", "/no/such.yaml"], "does not exist"),
        (["run", "--set", "index.top_k=0"], "top_k"),
        (["benchmark", "--variant", "nope"], "unknown benchmark variant 'nope'; choose from: 'kgmel'"),
        (["run", "--set", "dataset.path=/no/such/folder"], "dataset.path: /no/such/folder does not exist"),
        (["ablations", "--set", "dataset.path=/no/such/folder"], "dataset.path: /no/such/folder does not exist"),
        (["run", "--set", "dataset.path=README.md"], "is a file, not a folder"),
        (["query", "select 1", "--output", "xml"], "is not one of"),
        (["run", "--set", "training.epoch=10"], "training.epoch: no such setting; did you mean training.epochs?"),
        (["run", "--set", "artifacts=README.md"], "artifacts: " + str(ROOT / "README.md") + " is a file, not a folder"),
    ):
        out = subprocess.run([*KGMEL, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 2, (argv, out.stdout, out.stderr)
        assert message in out.stdout + out.stderr, argv
        assert "temporary server" not in out.stdout + out.stderr  # no Prefect server was started


def test_help_lists_choices_and_defaults():
    out = subprocess.run([*KGMEL, "run", "--help"], capture_output=True, text=True, cwd=ROOT, env={
        **__import__("os").environ, "COLUMNS": "200"})
    assert "full-pipeline|reindex-kb|ablations" in out.stdout and "default: full-pipeline" in out.stdout
    top = subprocess.run([*KGMEL, "--help"], capture_output=True, text=True, cwd=ROOT)
    for command in ("run", "link", "reindex", "status", "query", "verify", "models"):
        assert re.search(rf"│ {command}\b", top.stdout), command


def test_link_runs_the_llm_on_the_mentions_it_was_given(linked):
    folder, calls = linked
    assert calls == 4  # generate + rerank for each of the 2 new mentions, although the config scope is [test]
    catalog = Catalog(ArtifactStore(folder / "artifacts"))
    sources = catalog.query("select mention_id, source from predictions order by mention_id")
    assert sources["source"].to_list() == ["llm", "llm"]


def test_a_link_run_keeps_kb_views_and_joins_labels(linked):
    folder, _ = linked
    catalog = Catalog(ArtifactStore(folder / "artifacts"))
    assert catalog.query("select count(*) as n from entities")["n"][0] > 0
    assert catalog.query("select count(*) as n from kb_triples")["n"][0] > 0
    labeled = catalog.query("select mention_id, predicted_label from predictions_labeled order by mention_id")
    assert labeled["mention_id"].to_list() == ["new1-0", "new2-0"] and labeled["predicted_label"].null_count() == 0
    stages = set(catalog.query("select distinct stage from llm_calls")["stage"])
    assert stages == {"generate", "rerank"}  # every LLM stage of the run, not only the last
    history = catalog.query("select count(distinct artifact_key) as n from predictions_all")["n"][0]
    assert history == 2  # the full-pipeline run's predictions stay queryable


def test_a_stage_that_skips_every_mention_says_so(linked, capsys):
    folder, _ = linked
    install(FakeLLM())
    argv = ["link", str(folder / "new.json"), "--config", str(folder / "config.yaml"), "--config-scope"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "WARNING generate: none of the 2 mentions is in the configured LLM scope" in out
    # new.json names no image and no --image-dir was given: text-only linking is said, not silent
    assert "WARNING ingest_link: 2 of 2 mentions are linked from text alone: no image folder was given" in out


def test_csv_output_of_a_nested_column_names_it(linked, capsys):
    folder, _ = linked
    argv = ["query", "select mention_id, vector from fused_mentions limit 2", "--artifacts", str(folder / "artifacts")]
    assert main([*argv, "--output", "csv"]) == 2
    assert "--output csv cannot hold the nested columns ['vector']" in capsys.readouterr().out
    assert main([*argv, "--output", "json"]) == 0


def test_linking_an_empty_list_is_refused_before_any_server_starts(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = subprocess.run([*KGMEL, "link", str(empty)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "no sentence records to link" in out.stdout + out.stderr
    assert "temporary server" not in out.stdout + out.stderr


def _documented_queries() -> list[str]:
    """The README shows one query; the rest live in docs/ (artifacts.md holds the query cookbook)."""
    text = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    return [m.group(1) for m in re.finditer(r'kgmel query "((?:[^"\\]|\\.)*)"', text, re.S)]


def test_every_query_in_the_readme_and_docs_runs_as_written(linked):
    folder, _ = linked
    queries = _documented_queries()
    assert len(queries) >= 4
    catalog = Catalog(ArtifactStore(folder / "artifacts"))
    for sql in queries:
        catalog.query(sql.replace('\\"', '"'))  # raises on an unknown view or column


def test_after_a_link_run_the_evaluated_schema_still_shows_the_evaluated_run(linked):
    """The current views follow `kgmel link` (no gold answers); `evaluated.*` keeps the full-pipeline run's."""
    folder, _ = linked
    catalog = Catalog(ArtifactStore(folder / "artifacts"))
    linked_rows = catalog.query("select mention, correct, split from predictions_labeled order by mention")
    assert linked_rows.rows() == [("Peru", None, "link"), ("river", None, "link")]
    evaluated = catalog.query("select split, correct from evaluated.predictions_labeled")
    assert evaluated.height > 2 and set(evaluated["split"]) >= {"train", "val", "test"}
    assert evaluated["correct"].null_count() == 0
    errors = catalog.query("select count(*) as n from evaluated.mentions m join evaluated.candidates c "
                           "using (mention_id) where c.rank = 1 and c.qid <> m.gold_qid")["n"].item()
    wrong_top1 = catalog.query("select count(*) as n from evaluated.candidates_labeled where rank = 1 and not is_gold")
    assert errors == wrong_top1["n"].item()
    with catalog.connect() as con:  # the catalog file has the same schema
        assert con.execute("select count(*) from evaluated.predictions_labeled").fetchall() == [(evaluated.height,)]


def test_a_nearly_full_disk_is_refused_before_prefect_starts(tmp_path, monkeypatch, capsys):
    import shutil as real_shutil

    from flows import cli

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    assert main(["run", "--set", f"artifacts={tmp_path / 'artifacts'}"]) == 2
    assert "artifacts: only 1 MiB free" in capsys.readouterr().out


def test_a_read_only_file_system_is_refused_before_prefect_starts(tmp_path, monkeypatch, capsys):
    """Checked by the mount's flag as well as `os.access`, which says yes to root on a read-only mount."""
    import os as real_os

    from flows import cli

    flags = real_os.statvfs(tmp_path)
    monkeypatch.setattr(cli.os, "statvfs", lambda path: type("Vfs", (), {"f_flag": flags.f_flag | real_os.ST_RDONLY}))
    assert main(["run", "--set", f"artifacts={tmp_path / 'artifacts'}"]) == 2
    assert f"artifacts: {tmp_path / 'artifacts'} is not writable (its nearest existing folder {tmp_path})" in (
        capsys.readouterr().out
    )


def test_the_documented_plain_duckdb_snippet_reads_the_catalog(linked):
    """The catalog's views hold paths relative to the store root: the docs show how plain DuckDB opens them."""
    folder, _ = linked
    text = (ROOT / "docs" / "artifacts.md").read_text()
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "duckdb.connect" in block]
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=folder, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "predicted_label" in out.stdout


def test_an_error_is_one_line_on_a_narrow_terminal():
    """Rich would wrap it at the terminal's width (a long path broke the message across lines)."""
    import os

    long_path = "/no/such/" + "deeply/nested/" * 6 + "folder"
    env = {**os.environ, "COLUMNS": "40"}
    out = subprocess.run([*KGMEL, "run", "--set", f"dataset.path={long_path}"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2
    assert f"kgmel: error: dataset.path: {long_path} does not exist\n" in out.stdout


def test_link_prints_nil_for_mentions_the_served_nil_model_finds_absent(linked, capsys):
    folder, _ = linked
    install(FakeLLM())
    argv = ["link", str(folder / "new.json"), "--config", str(folder / "config.yaml")]
    catalog = Catalog(ArtifactStore(folder / "artifacts"))
    assert main([*argv, "--set", "nil.enabled=true", "--set", "nil.threshold=0"]) == 0  # every mention NIL
    printed = capsys.readouterr().out
    assert re.search(r"new1-0\s.*Peru\s.*NIL\s.*NIL", printed) and re.search(r"new2-0\s.*river\s.*NIL\s.*NIL", printed)
    decided = catalog.query("select nil, nil_score from predictions_labeled order by mention_id")
    assert decided["nil"].to_list() == [True, True] and decided["nil_score"].null_count() == 0
    assert main([*argv, "--set", "nil.enabled=true"]) == 0  # the served model's own threshold
    threshold = catalog.query("select stats.threshold as t from manifests where stage = 'fit_nil'")["t"][0]
    decided = catalog.query("select nil, nil_score from predictions_labeled order by mention_id")
    assert decided["nil"].to_list() == [s >= float(threshold) for s in decided["nil_score"]]
    assert main(argv) == 0  # NIL off: the earlier run's decisions are not joined to this run's answers
    left = catalog.query("select count(*) as n from predictions_labeled where nil or nil_score is not null")
    assert left["n"][0] == 0
    assert "NIL" not in capsys.readouterr().out.split("predicted_label")[-1]


def test_generate_runs_stage_1_alone_on_a_per_split_sample_and_a_rerun_asks_nothing(
    prefect_harness, small_demo, tmp_path
):
    fake = FakeLLM()
    install(fake)
    root = tmp_path / "artifacts"
    argv = ["generate", "--set", f"dataset.path={small_demo}", "--set", f"artifacts={root}",
            "--set", "generation.llm={model: fake/model, timeout_s: 2, retries: 0}",
            "--set", "generation.scope.per_split={train: 4, val: 3}", "--set", "generation.scope.sample_seed=0"]
    assert main(argv) == 0
    store = ArtifactStore(root)
    [key] = store.keys("generate")
    generated = store.require("generate", key)
    assert generated.manifest["stats"]["in_scope"] == 7 and 0 < fake.calls <= 7
    asked = generated.read("mention_generations").filter(status="ok")
    mentions = store.require("ingest", store.keys("ingest")[0]).read("mentions")
    assert dict(mentions.join(asked, on="mention_id")["split"].value_counts().iter_rows()) == {"train": 4, "val": 3}
    assert store.keys("train") == [] and store.keys("embed") == []  # stage 1 alone: nothing trained
    calls = fake.calls
    assert main(argv) == 0 and fake.calls == calls and store.keys("generate") == [key]


def test_the_temporary_server_boots_in_the_background_and_prefect_uses_that_one(tmp_path):
    """Without an API URL the CLI boots Prefect's temporary server while it imports; Prefect's own client
    must then talk to that server, not start another."""
    snippet = """
import httpx
from flows.cli import start_temporary_server
from prefect.client.orchestration import get_client
from prefect.server.api.server import SubprocessASGIServer

booting = start_temporary_server()
booting.join()
server = SubprocessASGIServer()
assert server.running, "the background start did not finish"
assert httpx.get(f"{server.api_url}/health", timeout=10).status_code == 200
with get_client(sync_client=True) as client:
    assert client.api_url.host == "127.0.0.1" and client.api_url.port == server.port, client.api_url
server.stop()
print("ok")
"""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=180)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
