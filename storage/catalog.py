"""DuckDB catalog over the artifact store: one view per table pointing at the current artifact.

The catalog is a convenience for people (`duckdb <root>/kgmel.duckdb -c "from candidates"`); the
Parquet artifacts stay the source of truth, so a catalog that cannot be updated (another process
holds the DuckDB file) only logs a warning and never fails a stage.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import duckdb
import polars as pl

from storage.store import Artifact, ArtifactStore

log = logging.getLogger(__name__)
CATALOG_FILE = "kgmel.duckdb"
_lock = threading.Lock()


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


class Catalog:
    def __init__(self, store: ArtifactStore):
        self.store = store
        self.path = store.root / CATALOG_FILE

    def connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        return duckdb.connect(str(self.path), read_only=read_only)

    def publish(self, artifact: Artifact) -> None:
        """Point each of the artifact's tables' views at it, and refresh the cross-run views."""
        statements = [
            f"create or replace view {table} as select * from read_parquet("
            f"{_quote(artifact.table_path(table) / '*.parquet')})"
            for table in artifact.manifest["tables"]
        ]
        self._execute(statements + self._cross_run_views())

    def refresh(self) -> None:
        self._execute(self._cross_run_views())

    def _cross_run_views(self) -> list[str]:
        root = self.store.root
        views = []
        if any(root.glob("_runs/*.parquet")):
            views.append(
                "create or replace view runs as select * from "
                f"read_parquet({_quote(root / '_runs/*.parquet')}, union_by_name=true)"
            )
        if any(root.glob("*/*/manifest.json")):
            views.append(
                "create or replace view manifests as select stage, key, version, created_at, seconds, "
                "tables, config, inputs, stats from read_json("
                f"{_quote(root / '*/*/manifest.json')}, union_by_name=true, format='auto')"
            )
        if any(root.glob("*/*/llm_calls/*.parquet")):  # generate and rerank both write one
            views.append(
                "create or replace view llm_calls_all as select * from "
                f"read_parquet({_quote(root / '*/*/llm_calls/*.parquet')}, union_by_name=true)"
            )
        if any(root.glob("evaluate/*/metrics/*.parquet")):
            views.append(
                "create or replace view metrics_all as select regexp_extract(filename, '/evaluate/([^/]+)/', 1) "
                "as evaluate_key, * exclude (filename) from "
                f"read_parquet({_quote(root / 'evaluate/*/metrics/*.parquet')}, filename=true, union_by_name=true)"
            )
        return views

    def _execute(self, statements: list[str]) -> None:
        if not statements:
            return
        with _lock:
            try:
                with self.connect() as con:
                    for statement in statements:
                        con.execute(statement)
            except duckdb.IOException as exc:  # the file is locked by another process
                log.warning("DuckDB catalog %s not updated (%s); artifacts are unaffected", self.path, exc)

    def query(self, sql: str) -> pl.DataFrame:
        with _lock, self.connect(read_only=True) as con:
            return con.sql(sql).pl()
