import duckdb
import polars as pl

from storage import ArtifactStore, Catalog, RunLog, StageRecord


def _artifact(store, stage, key, **tables):
    with store.writer(stage, key, code="c", config={}, inputs={}) as writer:
        for name, values in tables.items():
            writer.write_table(name, pl.DataFrame({"n": values}))
    return store.require(stage, key)


def test_views_follow_the_latest_run_and_history_keeps_every_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    _artifact(store, "retrieve", "old", candidates=[1, 2])
    _artifact(store, "retrieve", "new", candidates=[3, 4, 5])
    RunLog(store, "run-1", "full-pipeline").add(StageRecord("retrieve", "old", False, 2, 0.5))
    RunLog(store, "run-2", "full-pipeline").add(StageRecord("retrieve", "new", False, 3, 0.5))
    catalog = Catalog(store)
    assert catalog.refresh()
    with catalog.connect() as con:
        assert con.execute("select sum(n) from candidates").fetchone()[0] == 12
        assert con.execute("select artifact_key, sum(n) from candidates_all group by 1 order by 1").fetchall() == [
            ("new", 12),
            ("old", 3),
        ]
        assert sorted(r[0] for r in con.execute("select run_id from runs").fetchall()) == ["run-1", "run-2"]
        assert sorted(r[0] for r in con.execute("select key from manifests").fetchall()) == ["new", "old"]


def test_an_empty_table_of_a_later_run_never_hides_real_rows(tmp_path):
    store = ArtifactStore(tmp_path)
    _artifact(store, "ingest", "kb", entities=[1, 2, 3])
    _artifact(store, "ingest_link", "new", entities=[])
    RunLog(store, "run-1", "full-pipeline").add(StageRecord("ingest", "kb", False, 3, 0.1))
    RunLog(store, "run-2", "link").add(StageRecord("ingest_link", "new", False, 0, 0.1))
    assert Catalog(store).query("select count(*) as n from entities")["n"][0] == 3


def test_catalog_file_uses_relative_paths_so_a_copied_root_reads_its_own_files(tmp_path):
    import shutil

    store = ArtifactStore(tmp_path / "a")
    _artifact(store, "retrieve", "k", candidates=[1])
    RunLog(store, "run-1", "full-pipeline").add(StageRecord("retrieve", "k", False, 1, 0.1))
    Catalog(store).refresh()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    with duckdb.connect(str(tmp_path / "b" / "kgmel.duckdb"), read_only=True) as con:
        con.execute(f"set file_search_path = '{tmp_path / 'b'}'")
        assert con.execute("select sum(n) from candidates").fetchone()[0] == 1
