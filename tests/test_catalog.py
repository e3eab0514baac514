import duckdb
import polars as pl

from storage import ArtifactStore, Catalog, RunLog, StageRecord


def test_views_point_at_current_artifact_and_runs(tmp_path):
    store = ArtifactStore(tmp_path)
    catalog = Catalog(store)
    for key, values in (("old", [1, 2]), ("new", [3, 4, 5])):
        with store.writer("ingest", key, config={}, inputs={}, version="1") as writer:
            writer.write_table("mentions", pl.DataFrame({"n": values}))
        catalog.publish(store.require("ingest", key))
    RunLog(store, "run-1", "full-pipeline").add(StageRecord("ingest", "new", False, 3, 0.5))
    catalog.refresh()
    with duckdb.connect(str(tmp_path / "kgmel.duckdb"), read_only=True) as con:
        assert con.execute("select sum(n) from mentions").fetchone()[0] == 12
        assert con.execute("select stage, key, cache_hit from runs").fetchall() == [("ingest", "new", False)]
        assert sorted(r[0] for r in con.execute("select key from manifests").fetchall()) == ["new", "old"]
