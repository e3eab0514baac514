"""DuckDB views over the artifact store: what is current, and every run's history.

The views are derived, never a source of truth: they are rebuilt from the store's verified
manifests, the run log and the model registry, so a damaged or unfinished artifact is never in
them and a lost update fixes itself at the next refresh. Each view reads an explicit list of files
(no glob patterns, so temporary folders and odd characters in the root are harmless).

- `<root>/kgmel.duckdb` holds the views with paths relative to the root (a copied root keeps
  working); open it with `file_search_path` set to the root (`Catalog.connect`), or `cd` there.
- `kgmel query` never opens that file: it builds the same views in an in-memory database with
  absolute paths, then locks it down (reads only under the root, SELECT/EXPLAIN only), so a query
  can neither write an artifact nor block a running flow's refresh.

Current views: KB tables (`entities`, `kb_triples`, `fused_entities`) follow the model served under
the latest run's model name; every other table follows the latest run that wrote rows into it;
`llm_calls` joins every LLM stage of that run. Schema `evaluated` holds the same views for the latest
full-pipeline run (the one with gold answers and metrics). History views `<table>_all` (candidates, predictions,
metrics, llm_calls, ...) hold every artifact's rows with its `stage` and `artifact_key`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import duckdb
import polars as pl
import tenacity

from storage.registry import RegistryError
from storage.runs import RUNS_DIR
from storage.store import MANIFEST, Artifact, ArtifactStore

log = logging.getLogger(__name__)
CATALOG_FILE = "kgmel.duckdb"
# Runs whose outputs are "current": what the pipeline served. Experiments (ablations, benchmarks)
# appear in the history views only.
CURRENT_FLOWS = ("full-pipeline", "link", "reindex-kb")
HISTORY_TABLES = (
    "mentions",
    "candidates",
    "predictions",
    "metrics",
    "llm_calls",
    "mention_triples",
    "mention_generations",
    "filter_counts",
    "training_history",
    "rejected",
)
# The same current views for the latest full-pipeline run alone, in their own schema: after `kgmel link`
# the main views show the linked mentions (no gold answers), and `evaluated.*` still the evaluated run.
EVALUATED_FLOW, EVALUATED_SCHEMA = "full-pipeline", "evaluated"
READ_ONLY_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_lock = threading.Lock()


class QueryRefused(ValueError):
    """A statement `kgmel query` does not run (it would write or change settings)."""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _file_list(paths: list[str], base: Callable[[str], str]) -> str:
    return "[" + ", ".join(_quote(base(p)) for p in paths) + "]"


class Catalog:
    def __init__(self, store: ArtifactStore):
        self.store = store
        self.path = store.root / CATALOG_FILE  # local: the store root; remote: its local cache folder

    # -- what the views show ---------------------------------------------------------------------

    def _run_parts(self) -> list[str]:
        fsx = self.store.fsx
        return [fsx.join(RUNS_DIR, n) for n in fsx.entries(fsx.join(RUNS_DIR), dirs=False) if n.endswith(".parquet")]

    def _runs(self, parts: list[str]) -> tuple[pl.DataFrame | None, list[str]]:
        """The run log, and the parts it was read from (a damaged one is left out, logged)."""
        frames, readable = [], []
        for part in parts:
            try:
                frames.append(pl.from_arrow(self.store.fsx.read_table([part])))
                readable.append(part)
            except Exception as exc:  # one damaged log must not hide the others
                log.warning("run log %s unreadable, left out of the catalog: %s", part, exc)
        return (pl.concat(frames, how="diagonal_relaxed") if frames else None), readable

    def current_artifacts(
        self, artifacts: dict[str, Artifact], runs: pl.DataFrame | None
    ) -> tuple[dict[str, list[Artifact]], set[str]]:
        """Table name -> the artifact(s) its current view reads; and the tables chosen from the run that wrote
        the current `candidates` (only those are joined to them: an older run's answers for the same mention
        ids are not this run's)."""
        chosen: dict[str, list[Artifact]] = {}
        run_of: dict[str, str] = {}
        if runs is None or runs.height == 0:
            return chosen, set()
        if runs["flow"].is_in(CURRENT_FLOWS).any():
            runs = runs.filter(pl.col("flow").is_in(CURRENT_FLOWS))
        order = (
            runs.group_by("run_id").agg(pl.col("finished_at").max()).sort("finished_at", descending=True)["run_id"]
        )
        latest_model = None
        for run_id in order:
            records = runs.filter((pl.col("run_id") == run_id) & (pl.col("status") == "ok"))
            run_artifacts = [artifacts[f"{s}/{k}"] for s, k in zip(records["stage"], records["key"], strict=True)
                             if f"{s}/{k}" in artifacts]
            if latest_model is None and "model" in records.columns:
                latest_model = next((m for m in records["model"] if m), None)
            if run_id == order[0]:
                calls = [a for a in run_artifacts if a.tables.get("llm_calls")]
                if calls:
                    chosen["llm_calls"] = calls
            for artifact in reversed(run_artifacts):
                for table, rows in artifact.tables.items():
                    if rows and table not in chosen:
                        chosen[table] = [artifact]
                        run_of[table] = run_id
        served = self._served_kb(artifacts, latest_model)
        chosen.update(served)
        # Tables only ever written empty still get a view (their schema), from any run.
        for artifact in artifacts.values():
            for table in artifact.tables:
                chosen.setdefault(table, [artifact])
        same_run = {t for t, run in run_of.items() if run == run_of.get("candidates")}
        return chosen, same_run

    def _served_kb(self, artifacts: dict[str, Artifact], model: str | None) -> dict[str, list[Artifact]]:
        if not model:
            return {}
        try:
            version = self.store.models.require(model).serving
        except RegistryError:
            return {}
        index = artifacts.get(f"index/{version.index}")
        if index is None:
            return {}
        ingest_ref = index.manifest["inputs"].get("ingest")
        ingest = artifacts.get(f"{ingest_ref['stage']}/{ingest_ref['key']}") if ingest_ref else None
        out = {"fused_entities": [index]}
        if ingest is not None:
            out.update(entities=[ingest], kb_triples=[ingest])
        return out

    def statements(self, base: Callable[[str], str]) -> list[str]:
        """`create or replace view` statements for the store as it is now; `base` renders a file path."""
        artifacts = {a.id: a for a in self.store.artifacts()}
        runs, run_parts = self._runs(self._run_parts())
        statements = self._current_views(*self.current_artifacts(artifacts, runs), base, "main")
        evaluated = runs.filter(pl.col("flow") == EVALUATED_FLOW) if runs is not None else None
        if evaluated is not None and evaluated.height:
            statements.append(f"create schema if not exists {EVALUATED_SCHEMA}")
            statements += self._current_views(*self.current_artifacts(artifacts, evaluated), base, EVALUATED_SCHEMA)
        for table in HISTORY_TABLES:
            holders = [a for a in artifacts.values() if table in a.tables]
            parts = [p for a in holders for p in a.parts(table)]
            if parts:
                statements.append(
                    f"create or replace view {table}_all as select "
                    r"regexp_extract(filename, '([^/]+)/([^/]+)/[^/]+/[^/]+$', 1) as stage, "
                    r"regexp_extract(filename, '([^/]+)/([^/]+)/[^/]+/[^/]+$', 2) as artifact_key, "
                    f"* exclude (filename) from read_parquet({_file_list(parts, base)}, "
                    "union_by_name=true, filename=true)"
                )
        if run_parts and runs is not None:
            statements.append(
                f"create or replace view runs as select * from read_parquet({_file_list(run_parts, base)}, "
                "union_by_name=true)"
            )
        if artifacts:
            manifests = [self.store.fsx.under(a.path, MANIFEST) for a in artifacts.values()]
            statements.append(
                "create or replace view manifests as select stage, key, code, digest, created_at, seconds, tables, "
                f"config, inputs, stats from read_json({_file_list(manifests, base)}, maximum_depth=2, "
                "format='auto', union_by_name=true)"
            )
        registry = self.store.models
        events = [p for name in registry.names() for p in registry.event_files(name)]
        if events:
            statements.append(
                "create or replace view model_events as select "
                r"regexp_extract(filename, '([^/]+)/[^/]+\.json$', 1) as model, * exclude (filename) "
                f"from read_json({_file_list(events, base)}, maximum_depth=2, format='auto', "
                "union_by_name=true, filename=true)"
            )
        return statements

    @classmethod
    def _current_views(cls, chosen: dict[str, list[Artifact]], same_run: set[str], base: Callable[[str], str],
                       schema: str) -> list[str]:
        statements = []
        for table, sources in sorted(chosen.items()):
            parts = [p for a in sources for p in a.parts(table)]
            statements.append(
                f"create or replace view {schema}.{table} as select * from "
                f"read_parquet({_file_list(parts, base)}, union_by_name=true)"
            )
        return statements + cls._labeled_views(set(chosen), same_run, schema)

    @staticmethod
    def _labeled_views(views: set[str], same_run: set[str], schema: str) -> list[str]:
        """Join views a user would otherwise write by hand: labels of predictions and candidates, and the NIL
        decision where the run that wrote the candidates made one."""
        if not {"candidates", "mentions", "entities"} <= views:
            return []
        candidates, mentions, entities, predictions, decisions = (
            f"{schema}.{t}" for t in ("candidates", "mentions", "entities", "predictions", "nil_decisions"))
        reranked = "predictions" in views and "predictions" in same_run
        decided = "nil_decisions" in views and "nil_decisions" in same_run
        predicted = "coalesce(p.qid, c.qid)" if reranked else "c.qid"
        source = "coalesce(p.source, 'retrieval')" if reranked else "'retrieval'"
        reason = "p.reason" if reranked else "null"
        join_predictions = f"left join {predictions} p using (mention_id) " if reranked else ""
        nil = "coalesce(n.nil, false) as nil, n.nil_score" if decided else "false as nil, null::double as nil_score"
        join_decisions = f"left join {decisions} n using (mention_id) " if decided else ""
        return [
            f"create or replace view {schema}.candidates_labeled as select c.mention_id, m.mention, c.rank, c.qid, "
            f"e.label, e.description, c.score, m.gold_qid, c.qid = m.gold_qid as is_gold from {candidates} c "
            f"join {mentions} m using (mention_id) left join {entities} e on e.qid = c.qid",
            f"create or replace view {schema}.predictions_labeled as select c.mention_id, m.mention, m.sentence, "
            f"m.split, {predicted} as predicted_qid, e.label as predicted_label, e.description as "
            f"predicted_description, {source} as source, {reason} as reason, cp.rank as candidate_rank, "
            f"cp.score as score, {nil}, m.gold_qid, m.gold_label, {predicted} = m.gold_qid as correct "
            f"from {candidates} c join {mentions} m using (mention_id) {join_predictions}{join_decisions}"
            f"left join {candidates} cp on cp.mention_id = c.mention_id and cp.qid = {predicted} "
            f"left join {entities} e on e.qid = {predicted} where c.rank = 1",
        ]

    # -- the DuckDB file -----------------------------------------------------------------------

    def connect(self, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """The catalog file of a local store, with relative paths resolving under the store root."""
        con = duckdb.connect(str(self.path), read_only=read_only)
        con.execute(f"set file_search_path = {_quote(self.store.fsx.base)}").fetchall()
        return con

    def refresh(self, attempts: int = 5) -> bool:
        """Rebuild the views in the catalog file; retried while another process holds its lock.

        Returns False (and logs) when it could not: the artifacts are unaffected, and the next
        refresh rebuilds every view from the store anyway. A store on object storage has no catalog
        file (DuckDB cannot keep one there): `kgmel query` builds its views in memory.
        """
        if not self.store.fsx.local:
            return True
        base = self.store.fsx.base
        statements = self.statements(lambda p: os.path.relpath(p, base))
        retrying = tenacity.Retrying(  # while another process holds the file's lock
            stop=tenacity.stop_after_attempt(attempts), wait=tenacity.wait_exponential(multiplier=0.2),
            retry=tenacity.retry_if_exception_type(duckdb.IOException), reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._rebuild(statements)
        except duckdb.Error as exc:
            log.warning("DuckDB catalog %s not updated (%s); artifacts are unaffected, the next refresh rebuilds it",
                        self.path, exc)
            return False
        finally:
            self.refresh_attempts = retrying.statistics.get("attempt_number", 0)
        return True

    def _rebuild(self, statements: list[str]) -> None:
        with _lock, self.connect(read_only=False) as con:
            existing = [r[0] for r in con.execute(
                "select view_name from duckdb_views() where not internal and schema_name = 'main'"
            ).fetchall()]
            con.execute("begin").fetchall()
            for view in existing:
                con.execute(f'drop view if exists "{view}"').fetchall()
            con.execute(f"drop schema if exists {EVALUATED_SCHEMA} cascade").fetchall()
            for statement in statements:
                con.execute(statement).fetchall()
            con.execute("commit").fetchall()

    # -- read-only queries -------------------------------------------------------------------------

    def query_connection(self) -> duckdb.DuckDBPyConnection:
        """An in-memory database with the catalog's views that can read only under the store root."""
        fsx = self.store.fsx
        con = duckdb.connect()
        if not fsx.local:
            con.register_filesystem(fsx.fs)  # no extension download: DuckDB reads through fsspec
        for statement in self.statements(fsx.uri):
            con.execute(statement).fetchall()
        con.execute(f"set allowed_directories = [{_quote(fsx.uri(fsx.base) + '/')}]").fetchall()
        con.execute("set enable_external_access = false").fetchall()
        con.execute("set lock_configuration = true").fetchall()
        return con

    @staticmethod
    def check_read_only(sql: str) -> None:
        """Refuse anything but SELECT/EXPLAIN, judged by DuckDB's own parser (not by string matching)."""
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise QueryRefused(f"cannot parse the query: {exc}") from None
        for statement in statements:
            if statement.type not in READ_ONLY_STATEMENTS:
                raise QueryRefused(
                    f"kgmel query runs SELECT/EXPLAIN only; refused a {statement.type.name} statement: "
                    f"{statement.query.strip()[:80]}"
                )

    def query(self, sql: str) -> pl.DataFrame:
        self.check_read_only(sql)
        with self.query_connection() as con:
            return con.sql(sql).pl()
