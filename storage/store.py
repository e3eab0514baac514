"""Content-addressed artifact store: one folder per stage output, Parquet tables, a manifest.

The pipeline, not Prefect's result cache, decides what can be skipped: an artifact's key is a hash
of (stage, stage version, stage config, input artifact keys), so the same inputs always map to the
same folder and a changed input or config can never be served a stale table. Folders are built
under a temporary name and renamed into place only after every file and the manifest are written;
a folder without a complete manifest is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

CODE_VERSION = "0.1.0"
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or does not hold what a stage expects."""


def canonical_json(value: Any) -> str:
    """Serialise config deterministically so equal configs hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(stage: str, version: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Key of a stage output; inputs maps input names to their artifact keys or content hashes."""
    payload = canonical_json({"stage": stage, "version": version, "config": config, "inputs": inputs})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A complete stage output on disk."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]

    def table_path(self, table: str) -> Path:
        return self.path / table

    def read(self, table: str) -> pl.DataFrame:
        if table not in self.manifest["tables"]:
            raise ArtifactError(
                f"artifact {self.stage}/{self.key} has no table {table!r}; it has {sorted(self.manifest['tables'])}"
            )
        return pl.read_parquet(self.table_path(table) / "*.parquet")

    def read_arrow(self, table: str) -> pa.Table:
        return pq.read_table(self.table_path(table))

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise ArtifactError(f"artifact {self.stage}/{self.key} has no file {name!r}")
        return self.path / "files" / name


@dataclass
class ArtifactWriter:
    """Collects a stage's tables and files in a temporary folder until commit."""

    stage: str
    key: str
    tmp_path: Path
    tables: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def write_table(self, name: str, table: pa.Table | pl.DataFrame, schema: pa.Schema | None = None) -> None:
        arrow = table.to_arrow() if isinstance(table, pl.DataFrame) else table
        if schema is not None:
            arrow = conform(arrow, schema, f"{self.stage}.{name}")
        folder = self.tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(arrow, folder / "part-0.parquet", compression="zstd")
        self.tables[name] = arrow.num_rows

    def file_path(self, name: str) -> Path:
        """A path to write a non-tabular file (checkpoint, index) into; registered on commit."""
        path = self.tmp_path / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files[name] = 0
        return path


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Cast a table to a declared schema, naming the missing or uncastable column on failure."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ArtifactError(f"{where}: missing columns {missing} (have {table.column_names})")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ArtifactError(f"{where}: does not fit its schema: {exc}") from exc


class ArtifactStore:
    """Artifacts under `root/<stage>/<key>/`; see the module docstring for the guarantees."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Artifact | None:
        """The complete artifact for (stage, key), or None when it is absent or was never finished."""
        folder = self.path(stage, key)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            return None
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("status") != "complete":
            return None
        for table in manifest["tables"]:
            if not any((folder / table).glob("*.parquet")):
                return None  # a table file was deleted by hand: treat the artifact as absent
        for name in manifest.get("files", {}):
            if not (folder / "files" / name).exists():
                return None
        return Artifact(stage, key, folder, manifest)

    def require(self, stage: str, key: str) -> Artifact:
        artifact = self.get(stage, key)
        if artifact is None:
            raise ArtifactError(f"no complete artifact {stage}/{key} under {self.root}")
        return artifact

    def latest(self, stage: str) -> Artifact | None:
        """The most recently created complete artifact of a stage (for flows that reuse a trained model)."""
        best: Artifact | None = None
        for folder in (self.root / stage).glob("*") if (self.root / stage).is_dir() else []:
            if folder.name.startswith(_TMP_PREFIX):
                continue
            artifact = self.get(stage, folder.name)
            if artifact and (best is None or artifact.manifest["created_at"] > best.manifest["created_at"]):
                best = artifact
        return best

    @contextmanager
    def writer(
        self,
        stage: str,
        key: str,
        *,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        version: str,
        replace: bool = False,
    ) -> Iterator[ArtifactWriter]:
        """Write an artifact atomically: everything lands in a temp folder renamed into place at the end.

        If the body raises, the temp folder is removed and no artifact exists for the key. With
        `replace`, a complete artifact already at the key is swapped for the new one (forced rebuild).
        """
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / f"{_TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        started = time.perf_counter()
        writer = ArtifactWriter(stage, key, tmp)
        try:
            yield writer
            for name in writer.files:
                path = tmp / "files" / name
                if not path.exists():
                    raise ArtifactError(f"{stage}/{key}: file {name!r} was registered but never written")
                writer.files[name] = path.stat().st_size
            manifest = {
                "stage": stage,
                "key": key,
                "version": version,
                "code_version": CODE_VERSION,
                "inputs": dict(inputs),
                "config": dict(config),
                "tables": writer.tables,
                "files": writer.files,
                "stats": writer.stats,
                "seconds": round(time.perf_counter() - started, 3),
                "created_at": datetime.now(UTC).isoformat(),
                "status": "complete",
            }
            _write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
            _fsync_dir(tmp)
            final = self.path(stage, key)
            if final.exists():
                # Kept unless forced; a folder without a complete manifest is always replaced.
                if self.get(stage, key) is not None and not replace:
                    shutil.rmtree(tmp)
                    return
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(stage_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def sweep_temporaries(self, older_than_s: float = 3600) -> int:
        """Remove temp folders left by crashed runs (never trusted anyway); returns how many.

        Only old ones: a concurrent run on the same store may be writing a young one right now.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        for tmp in self.root.glob(f"*/{_TMP_PREFIX}*"):
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        return removed


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet_atomic(table: pa.Table | pl.DataFrame, path: Path) -> None:
    """Write one Parquet file via temp + rename (used for run logs and the embedding cache)."""
    arrow = table.to_arrow() if isinstance(table, pl.DataFrame) else table
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")  # not matched by *.parquet globs while incomplete
    pq.write_table(arrow, tmp, compression="zstd")
    os.replace(tmp, path)


def folder_fingerprint(folder: Path) -> str:
    """Cheap fingerprint of a folder of images: names, sizes and mtimes (contents are hashed at ingest)."""
    digest = hashlib.sha256()
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
