"""The artifact store's file system: local disk or any fsspec URL (`s3://bucket/prefix`, `gs://…`).

Everything the store writes goes through here, so the same guarantees hold on both:
- a file is never seen half-written: locally it is written to a temporary name and renamed, on an
  object store a single PUT publishes it whole;
- nothing is found by globbing a path (a root may contain `[`, `?` or `*`): folders are listed and
  their entries filtered by name;
- a file's *signature* (size and mtime, or the object's ETag) says whether it changed since it was
  last hashed.
What must stay on local disk (the DuckDB catalog file, the LLM answer cache, scratch space, the
verification stat cache, downloaded checkpoints) lives in `local_root`: the root itself for a local
store, a per-URL folder of `~/.cache/kgmel/stores/` for a remote one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import re
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kgmel"


class StoreFS:
    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        text = str(url)
        self.fs, path = fsspec.core.url_to_fs(text, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.base = str(Path(path).resolve())
            self.local_root = Path(self.base)
            self.url = self.base
        else:
            self.base = path.rstrip("/")
            self.url = f"{self.protocol}://{self.base}"
            self.local_root = _cache_home() / "stores" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.local_root.mkdir(parents=True, exist_ok=True)
        if self.local:
            Path(self.base).mkdir(parents=True, exist_ok=True)

    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return protocol if isinstance(protocol, str) else protocol[0]

    def join(self, *parts: str) -> str:
        """A path in the store: `parts` relative to its root."""
        return self.under(self.base, *parts)

    def under(self, path: str, *parts: str) -> str:
        """`parts` below a path already in the store."""
        return os.path.join(path, *parts) if self.local else posixpath.join(path, *parts)

    def uri(self, path: str) -> str:
        """What DuckDB and people see: the local path, or `s3://bucket/key`."""
        return path if self.local else f"{self.protocol}://{path}"

    # -- reading --------------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def entries(self, folder: str, dirs: bool) -> list[str]:
        """Names (not paths) of the folders or files directly in `folder`; [] when it is absent."""
        try:
            listing = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        wanted = "directory" if dirs else "file"
        names = [posixpath.basename(e["name"].rstrip("/")) for e in listing if e.get("type") == wanted]
        return sorted(n for n in names if n)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as handle:
            return handle.read()

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode()

    def sha256(self, path: str) -> str:
        with self.fs.open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def signature(self, path: str) -> list:
        """[size, what changes when the file is rewritten]; FileNotFoundError when absent."""
        if self.local:
            stat = os.stat(path)
            return [stat.st_size, stat.st_mtime_ns]
        info = self.fs.info(path)
        return [int(info["size"]), str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")]

    def read_table(self, paths: list[str], columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(p, columns=columns, filesystem=None if self.local else self.fs) for p in paths]
        return pa.concat_tables(tables) if len(tables) != 1 else tables[0]

    # -- writing --------------------------------------------------------------------------------

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        if self.local:
            write_atomic(path, data)
        else:
            self.fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all

    def write_text_atomic(self, path: str, text: str) -> None:
        self.write_bytes_atomic(path, text.encode())

    def write_parquet_atomic(self, table: pa.Table, path: str) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes_atomic(path, buffer.getvalue())

    def put(self, local_path: Path, path: str) -> None:
        self.fs.put_file(str(local_path), path)

    def get(self, path: str, local_path: Path) -> None:
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f"{local_path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.fs.get_file(path, str(tmp))
        os.replace(tmp, local_path)

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def move(self, source: str, target: str) -> None:
        """Rename (local: atomic) or copy-and-delete (object stores)."""
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
        else:
            self.fs.copy(source, target, recursive=True)
            self.fs.rm(source, recursive=True)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a local file whole or not at all: a temp file beside it, fsynced, then renamed over it.
    A failed write (a full disk) removes its temp file; one left by a killed process names that
    process, so `sweep_stale_temp_files` can tell it from a live writer's."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{os.fspath(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_TEMP_NAME = re.compile(r"\.(\d+)-[0-9a-f]{8}\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temp_files(folder: Path, min_age_s: float = 600.0) -> int:
    """Remove the temp files of `write_atomic` under `folder` whose writer process is gone (killed
    mid-write); a live writer's – another run on this machine – is never touched. A write takes
    seconds, so files younger than `min_age_s` are left too: on a store shared by several machines a
    process id says nothing about another machine's writers. Returns the count removed."""
    removed, now = 0, time.time()
    for path in folder.rglob("*.tmp") if folder.is_dir() else []:
        match = _TEMP_NAME.search(path.name)
        if not match or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
            removed += 1
    return removed
