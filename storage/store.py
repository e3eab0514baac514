"""Content-addressed artifact store: one folder per stage output, Parquet tables, a verified manifest.

The pipeline, not Prefect's result cache, decides what can be skipped. An artifact's key hashes
everything that could change its content: the stage, the identity of the code that builds it,
its config, and the content digests of its inputs (source files or other artifacts). Its manifest
records the size and sha256 of every file it holds, and the store trusts an artifact only after
checking them, so "cached" means "provably the same bytes as when it was written", never "a folder
exists". Folders are built under a temporary name and renamed into place after every file and the
manifest are written; temporary folders are invisible to every reader.

Verification is cheap by default: a file whose (size, mtime) matches the last time its sha256 was
checked, by the writer that made it or a reader since, is trusted (the stat cache under `_verified/`,
like git's index); any other file is hashed again. Anything written through the file system changes
the mtime, so truncation, a bit flip or an overwrite is caught; silent corruption below the file system
needs `verify(full=True)`.

On an object store (an `s3://…` root) there is no rename: an artifact is staged on local disk,
its files are uploaded under the final prefix, and the manifest is uploaded last; a prefix without a
verifying manifest is never trusted, so a crash before the manifest leaves nothing a reader uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import StoreFS, sweep_stale_temp_files, write_atomic
from storage.registry import ModelRegistry

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # format 1 manifests recorded no digests: such artifacts are rebuilt, never trusted
TMP_PREFIX = ".tmp-"
VERIFIED_DIR = "_verified"
# A file written again within the file system clock's tick keeps its mtime ("racy git"): the writer puts in
# the stat cache only files last written longer ago than this, and leaves the rest to be hashed when read.
RACY_NS = 2_000_000_000
QUARANTINE_DIR = "_quarantine"

log = logging.getLogger(__name__)


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, damaged or does not hold what a stage expects."""


class ArtifactDamaged(ArtifactError):
    """A file of an artifact does not match its manifest (or cannot be read); the message names it."""


def canonical_json(value: Any) -> str:
    """Serialise config deterministically so equal configs hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(
    stage: str, code: str, config: Mapping[str, Any], inputs: Mapping[str, str], sources: Mapping[str, str]
) -> str:
    """Key of a stage output: stage, code identity, config, input artifacts' content digests, source hashes."""
    payload = canonical_json(
        {"stage": stage, "code": code, "config": config, "inputs": inputs, "sources": sources}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_digest(content: Mapping[str, Mapping[str, Any]]) -> str:
    """One digest for everything an artifact holds (its files' relative paths and sha256s)."""
    return hashlib.sha256(canonical_json({p: c["sha256"] for p, c in content.items()}).encode()).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A complete, verified stage output."""

    stage: str
    key: str
    path: str  # where it lives in the store (a local path, or a key under the bucket)
    manifest: dict[str, Any]
    store: ArtifactStore = field(repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.key}"

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def tables(self) -> dict[str, int]:
        """Table name -> row count."""
        return self.manifest["tables"]

    @property
    def rows(self) -> int:
        return int(sum(self.tables.values()))

    def parts(self, table: str) -> list[str]:
        """The Parquet files of a table, exactly as the manifest lists them (no globbing)."""
        if table not in self.tables:
            raise ArtifactError(f"artifact {self.id} has no table {table!r}; it has {sorted(self.tables)}")
        prefix = f"{table}/"
        files = sorted((rel for rel in self.manifest["content"] if rel.startswith(prefix)), key=_part_order)
        return [self.store.fsx.under(self.path, rel) for rel in files]

    def read(self, table: str, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.from_arrow(self.read_arrow(table, columns))

    def read_arrow(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """The table, or only `columns` of it (Parquet reads just those: the qids of 1M fused entities
        without their 3 GB of vectors)."""
        parts = self.parts(table)
        try:
            return self.store.fsx.read_table(parts, columns)
        except Exception as exc:  # a damaged file must name itself, not fail as a bare codec error
            raise ArtifactDamaged(f"artifact {self.id}: cannot read table {table!r} ({parts}): {exc}") from exc

    def folder(self, name: str) -> Path:
        """A local folder holding the files written with `ArtifactWriter.folder_path(name)`."""
        names = [f for f in self.manifest.get("files", {}) if f.startswith(f"{name}/")]
        if not names:
            raise ArtifactError(f"artifact {self.id} has no folder {name!r}")
        paths = [self.file(f) for f in names]
        return paths[0].parents[len(Path(names[0]).parts) - 2]

    def file(self, name: str) -> Path:
        """A local path to one of the artifact's files (checkpoint, index). From an object store it is
        downloaded once into the local cache and checked against the manifest's sha256."""
        if name not in self.manifest.get("files", {}):
            raise ArtifactError(f"artifact {self.id} has no file {name!r}")
        source = self.store.fsx.under(self.path, "files", name)
        if self.store.fsx.local:
            return Path(source)
        local = self.store.fsx.local_root / "_files" / self.stage / self.key / name
        expected = self.manifest["content"][f"files/{name}"]["sha256"]
        if not local.is_file() or file_sha256(local) != expected:
            self.store.fsx.get(source, local)
            if file_sha256(local) != expected:
                local.unlink()
                raise ArtifactDamaged(f"{self.store.fsx.uri(source)}: sha256 differs from the manifest")
        return local


@dataclass
class ArtifactWriter:
    """Collects a stage's tables and files in a temporary folder until commit."""

    stage: str
    key: str
    tmp_path: Path
    tables: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)
    _parts: dict[str, int] = field(default_factory=dict)

    def write_table(self, name: str, table: pa.Table | pl.DataFrame, schema: pa.Schema | None = None) -> None:
        """Write a table, or one more part of it when called again with the same name."""
        arrow = table.to_arrow() if isinstance(table, pl.DataFrame) else table
        if schema is not None:
            arrow = conform(arrow, schema, f"{self.stage}.{name}")
        folder = self.tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        part = self._parts.get(name, 0)
        pq.write_table(arrow, folder / f"part-{part}.parquet", compression="zstd")
        self._parts[name] = part + 1
        self.tables[name] = self.tables.get(name, 0) + arrow.num_rows

    def copy_part(self, name: str, fill: Callable[[Path], None]) -> None:
        """One more part of a table, written whole by `fill(path)`: a Parquet part of an input artifact
        copied byte for byte (no decoding and re-encoding of a table that did not change). Its rows are
        counted from its footer, which also refuses a file that is not Parquet."""
        folder = self.tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        part = self._parts.get(name, 0)
        path = folder / f"part-{part}.parquet"
        fill(path)
        rows = pq.read_metadata(path).num_rows
        self._parts[name] = part + 1
        self.tables[name] = self.tables.get(name, 0) + rows

    def written_parts(self, name: str) -> list[Path]:
        """The part files of a table written so far, in order (to read back before the artifact is published)."""
        return [self.tmp_path / name / f"part-{i}.parquet" for i in range(self._parts.get(name, 0))]

    def file_path(self, name: str) -> Path:
        """A path to write a non-tabular file (checkpoint, index) into; registered on commit."""
        path = self.tmp_path / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files[name] = 0
        return path

    def folder_path(self, name: str) -> Path:
        """A folder to write a model's files into (a library's `save_pretrained`); every file in it is
        registered on commit as `name/<file>`, and `Artifact.folder(name)` gives it back."""
        path = self.tmp_path / "files" / name
        path.mkdir(parents=True, exist_ok=True)
        self.folders.add(name)
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


@dataclass(frozen=True)
class InputRef:
    """How an artifact names one of its inputs: where it lives and the content it had when used."""

    stage: str
    key: str
    digest: str

    @classmethod
    def of(cls, artifact: Artifact) -> InputRef:
        return cls(artifact.stage, artifact.key, artifact.digest)


class ArtifactStore:
    """Artifacts under `<root>/<stage>/<key>/`; see the module docstring for the guarantees.

    `root` is a folder or an fsspec URL (`s3://bucket/prefix`); `storage_options` go to fsspec
    (e.g. `{"endpoint_url": …}` for an S3-compatible server)."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.fsx = StoreFS(root, storage_options)
        self.url = self.fsx.url
        # A local folder for what cannot live on an object store (catalog file, caches, scratch);
        # for a local store it is the root itself.
        self.root = self.fsx.local_root

    def path(self, stage: str, key: str) -> str:
        return self.fsx.join(stage, key)

    @property
    def models(self) -> ModelRegistry:
        """The named models this store serves."""
        return ModelRegistry(self.fsx)

    # -- reading and verifying -------------------------------------------------------------------

    def get(self, stage: str, key: str, full: bool = False) -> Artifact | None:
        """The verified artifact for (stage, key), or None when it is absent, unfinished or damaged.

        A damaged artifact is logged with its path and the reason, and treated as absent, so the
        stage that owns it rebuilds it (the writer moves the damaged folder to `_quarantine/`).
        """
        try:
            return self.check(stage, key, full=full)
        except FileNotFoundError:
            return None
        except ArtifactError as exc:
            log.warning("%s: not trusted, will be rebuilt: %s", self.fsx.uri(self.path(stage, key)), exc)
            return None

    def check(self, stage: str, key: str, full: bool = False) -> Artifact:
        """The artifact, verified; raises FileNotFoundError (absent) or ArtifactDamaged (why, naming the file)."""
        folder = self.path(stage, key)
        manifest_path = self.fsx.join(stage, key, MANIFEST)
        try:
            text = self.fsx.read_text(manifest_path)
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(manifest_path) from None
        try:
            manifest = json.loads(text)
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactDamaged(f"{manifest_path}: unreadable manifest ({exc})") from None
        if manifest.get("status") != "complete":
            raise ArtifactDamaged(f"{manifest_path}: status is {manifest.get('status')!r}, not 'complete'")
        if manifest.get("format") != MANIFEST_FORMAT or (manifest.get("stage"), manifest.get("key")) != (stage, key):
            raise ArtifactDamaged(f"{manifest_path}: not a format-{MANIFEST_FORMAT} manifest of {stage}/{key}")
        content = manifest.get("content") or {}
        if content_digest(content) != manifest.get("digest"):
            raise ArtifactDamaged(f"{manifest_path}: digest does not match the files it lists")
        stat_cache = self._stat_cache_path(stage, key)
        known = {} if full else _read_json(stat_cache)
        checked = {}
        for rel, expected in content.items():
            path = self.fsx.under(folder, rel)
            try:
                signature = self.fsx.signature(path)
            except FileNotFoundError:
                raise ArtifactDamaged(f"{self.fsx.uri(path)}: missing") from None
            where = self.fsx.uri(path)
            if signature[0] != expected["bytes"]:
                raise ArtifactDamaged(f"{where}: {signature[0]} bytes, the manifest says {expected['bytes']}")
            if known.get(rel) != signature and self.fsx.sha256(path) != expected["sha256"]:
                raise ArtifactDamaged(f"{where}: sha256 differs from the manifest (modified after it was written)")
            checked[rel] = signature
        if checked != known:
            with contextlib.suppress(OSError):  # a read-only store is verified again next time
                write_atomic(stat_cache, json.dumps(checked).encode())
        return Artifact(stage, key, folder, manifest, self)

    def require(self, stage: str, key: str) -> Artifact:
        try:
            return self.check(stage, key)
        except FileNotFoundError:
            raise ArtifactError(f"no complete artifact {stage}/{key} under {self.url}") from None

    def input(self, artifact: Artifact, name: str) -> Artifact:
        """The input `name` an artifact was built from, checked to still hold the same content."""
        ref = artifact.manifest.get("inputs", {}).get(name)
        if ref is None:
            known = sorted(artifact.manifest["inputs"])
            raise ArtifactError(f"artifact {artifact.id} has no input {name!r}; it has {known}")
        found = self.require(ref["stage"], ref["key"])
        if found.digest != ref["digest"]:
            raise ArtifactError(
                f"lineage broken: {artifact.id} was built from {found.id} with digest {ref['digest'][:12]}, "
                f"which now holds {found.digest[:12]} (rebuilt since); rebuild {artifact.stage}"
            )
        return found

    def exists(self, stage: str, key: str) -> bool:
        """Whether anything (trusted or not) lies at (stage, key)."""
        return self.fsx.exists(self.path(stage, key))

    def keys(self, stage: str) -> list[str]:
        """Keys of the finished folders of a stage (temporary folders are never listed)."""
        return [k for k in self.fsx.entries(self.fsx.join(stage), dirs=True) if not k.startswith(TMP_PREFIX)]

    def stages(self) -> list[str]:
        return [s for s in self.fsx.entries(self.fsx.base, dirs=True) if not s.startswith(("_", "."))]

    def artifacts(self, stage: str | None = None) -> Iterator[Artifact]:
        """Every trusted artifact (of one stage, or all); damaged ones are logged and skipped."""
        for name in [stage] if stage else self.stages():
            for key in self.keys(name):
                artifact = self.get(name, key)
                if artifact is not None:
                    yield artifact

    def verify(self, full: bool = True) -> list[tuple[str, str]]:
        """(artifact path, problem) for every artifact folder that fails verification."""
        problems = []
        for stage in self.stages():
            for key in self.keys(stage):
                try:
                    self.check(stage, key, full=full)
                except FileNotFoundError as exc:
                    problems.append((self.fsx.uri(self.path(stage, key)), f"no manifest ({exc})"))
                except ArtifactError as exc:
                    problems.append((self.fsx.uri(self.path(stage, key)), str(exc)))
        return problems

    def quarantine(self, stage: str, key: str, reason: str) -> str | None:
        """Move an untrusted artifact folder aside (kept for inspection, invisible to every reader)."""
        source = self.path(stage, key)
        if not self.fsx.exists(source):
            return None
        name = f"{key}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        target = self.fsx.join(QUARANTINE_DIR, stage, name)
        try:
            self.fsx.move(source, target)
        except FileNotFoundError:  # another process moved it first
            return None
        self.fsx.write_text_atomic(self.fsx.join(QUARANTINE_DIR, stage, name, "QUARANTINED.txt"), reason + "\n")
        self._stat_cache_path(stage, key).unlink(missing_ok=True)
        log.warning("moved untrusted artifact %s to %s: %s", self.fsx.uri(source), self.fsx.uri(target), reason)
        return target

    def _stat_cache_path(self, stage: str, key: str) -> Path:
        return self.root / VERIFIED_DIR / stage / f"{key}.json"

    # -- writing ---------------------------------------------------------------------------------

    @contextmanager
    def writer(
        self,
        stage: str,
        key: str,
        *,
        code: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, InputRef],
        sources: Mapping[str, str] | None = None,
        replace: bool = False,
    ) -> Iterator[ArtifactWriter]:
        """Write an artifact atomically: everything lands in a temp folder published at the end.

        If the body raises, the temp folder is removed and no artifact exists for the key. With
        `replace`, a trusted artifact already at the key is swapped for the new one (forced rebuild);
        an untrusted one is always replaced, after being moved to quarantine.
        """
        if self.fsx.local:
            stage_dir = Path(self.fsx.join(stage))
            stage_dir.mkdir(parents=True, exist_ok=True)
            tmp = stage_dir / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        else:
            tmp = self.root / "_staging" / stage / f"{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        started = time.perf_counter()
        writer = ArtifactWriter(stage, key, tmp)
        try:
            yield writer
            for folder in writer.folders:
                base = tmp / "files"
                inside = [p for p in (base / folder).rglob("*") if p.is_file()]
                writer.files.update({p.relative_to(base).as_posix(): 0 for p in inside})
            for name in writer.files:
                path = tmp / "files" / name
                if not path.exists():
                    raise ArtifactError(f"{stage}/{key}: file {name!r} was registered but never written")
                writer.files[name] = path.stat().st_size
            content, signatures, settled_before = {}, {}, time.time_ns() - RACY_NS
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = path.relative_to(tmp).as_posix()
                if self.fsx.local:  # what `check` compares, taken before the hash; a rename keeps it
                    signature = self.fsx.signature(str(path))
                    if signature[1] < settled_before:
                        signatures[rel] = signature
                content[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            manifest = {
                "format": MANIFEST_FORMAT,
                "stage": stage,
                "key": key,
                "code": code,
                "inputs": {name: {"stage": r.stage, "key": r.key, "digest": r.digest} for name, r in inputs.items()},
                "sources": dict(sources or {}),
                "config": dict(config),
                "tables": writer.tables,
                "files": writer.files,
                "content": content,
                "digest": content_digest(content),
                "stats": writer.stats,
                "seconds": round(time.perf_counter() - started, 3),
                "created_at": datetime.now(UTC).isoformat(),
                "status": "complete",
            }
            if self.exists(stage, key):
                try:
                    self.check(stage, key)
                    trusted = True
                except (FileNotFoundError, ArtifactError) as exc:
                    trusted = False
                    self.quarantine(stage, key, f"replaced by a rebuild: {exc}")
                if trusted and not replace:  # another run finished it first: keep theirs
                    shutil.rmtree(tmp)
                    return
                if trusted:
                    self.fsx.remove(self.path(stage, key))
            self._publish(tmp, stage, key, json.dumps(manifest, indent=2, default=str))
            # The files were hashed just now: the stat cache says so, or the first reader would hash
            # them all again (a 1M-entity index's vectors are most of a GB).
            stat_cache = self._stat_cache_path(stage, key)
            if self.fsx.local:
                with contextlib.suppress(OSError):
                    write_atomic(stat_cache, json.dumps(signatures).encode())
            else:
                stat_cache.unlink(missing_ok=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _publish(self, tmp: Path, stage: str, key: str, manifest: str) -> None:
        """Local: manifest into the temp folder, then one rename. Object store: every file under the
        final prefix, the manifest last (until then the prefix is not trusted by any reader)."""
        final = self.path(stage, key)
        if self.fsx.local:
            write_atomic(tmp / MANIFEST, manifest.encode())
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(Path(final).parent)
            return
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                self.fsx.put(path, self.fsx.join(stage, key, path.relative_to(tmp).as_posix()))
        self.fsx.write_text_atomic(self.fsx.join(stage, key, MANIFEST), manifest)
        shutil.rmtree(tmp, ignore_errors=True)

    def sweep_temporaries(self, older_than_s: float = 3600) -> int:
        """Remove temp folders and files left by crashed runs (never trusted anyway); returns how many.

        Only old ones: a concurrent run on the same store may be writing a young one right now.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        candidates = []
        if self.fsx.local:
            for stage in self.fsx.entries(self.fsx.base, dirs=True):
                candidates += [Path(self.fsx.join(stage, n)) for n in self.fsx.entries(self.fsx.join(stage), dirs=True)
                               if n.startswith(TMP_PREFIX)]
        staging = self.root / "_staging"
        candidates += [p for p in staging.glob("*/*") if p.is_dir()] if staging.is_dir() else []
        for tmp in candidates:
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        if self.fsx.local:  # temp files of single-file writes (run log, embedding cache, stat caches)
            for folder in self.fsx.entries(self.fsx.base, dirs=True):
                if folder.startswith("_"):
                    removed += sweep_stale_temp_files(Path(self.fsx.join(folder)))
        return removed


def _part_order(relative: str) -> tuple[int, str]:
    """Parts in the order they were written: part-10 after part-9 (a string sort reads part-10 second, and
    a table of 11+ parts, such as fused_entities past 655k entities, would come back out of row order)."""
    number = re.search(r"part-(\d+)\.parquet$", relative)
    return (int(number.group(1)) if number else -1, relative)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_fingerprint(folder: Path) -> str:
    """Cheap fingerprint of a folder of images: names, sizes and mtimes (contents are hashed at ingest)."""
    digest = hashlib.sha256()
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
