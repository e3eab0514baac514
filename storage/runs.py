"""Per-run log of stage outcomes (cache hit or built, rows, seconds), exposed as the `runs` view."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from storage.store import ArtifactStore

RUNS_DIR = "_runs"
RUN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("flow", pa.string()),
        ("model", pa.string()),  # the model name the run trains or serves (the catalog's KB views follow it)
        ("stage", pa.string()),
        ("key", pa.string()),
        ("cache_hit", pa.bool_()),
        ("rows", pa.int64()),
        ("seconds", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("note", pa.string()),  # why it was (re)built: forced, damaged copy, failed LLM calls re-attempted
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass
class StageRecord:
    stage: str
    key: str
    cache_hit: bool
    rows: int
    seconds: float
    status: str = "ok"
    error: str | None = None
    note: str | None = None
    finished_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class RunLog:
    """Appends stage records for one flow run and rewrites `_runs/<run_id>.parquet` atomically."""

    def __init__(self, store: ArtifactStore, run_id: str, flow: str, model: str | None = None):
        self.store, self.run_id, self.flow, self.model = store, run_id, flow, model
        self.records: list[StageRecord] = []
        self._lock = threading.Lock()

    # Prefect ships the calling task's context, parameters included, with every task it maps onto Dask
    # workers; a lock cannot travel, and a worker never writes the run log (the driver does).
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add(self, record: StageRecord) -> None:
        with self._lock:
            self.records.append(record)
            rows = [{**asdict(r), "run_id": self.run_id, "flow": self.flow, "model": self.model} for r in self.records]
            table = pa.Table.from_pylist(rows, schema=RUN_SCHEMA)
            self.store.fsx.write_parquet_atomic(table, self.store.fsx.join(RUNS_DIR, f"{self.run_id}.parquet"))
