import errno
import json
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from storage import ArtifactError, ArtifactStore, artifact_key
from storage import store as store_module
from storage.store import conform


def _write(store, key="k1", rows=3, fail=False, read=True):
    with store.writer("stage", key, code="c1", config={"a": 1}, inputs={}, sources={"x": "1"}) as writer:
        writer.write_table("numbers", pl.DataFrame({"n": list(range(rows))}))
        if fail:
            raise RuntimeError("boom")
    return store.require("stage", key) if read else None


def test_written_artifact_round_trips(tmp_path):
    store = ArtifactStore(tmp_path)
    artifact = _write(store)
    assert artifact.read("numbers")["n"].to_list() == [0, 1, 2]
    manifest = json.loads((Path(artifact.path) / "manifest.json").read_text())
    assert manifest["tables"] == {"numbers": 3} and manifest["status"] == "complete"
    assert manifest["sources"] == {"x": "1"} and manifest["config"] == {"a": 1} and manifest["code"] == "c1"
    assert set(manifest["content"]) == {"numbers/part-0.parquet"} and artifact.digest == manifest["digest"]


def test_exception_in_body_leaves_no_artifact_and_no_temp(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        _write(store, fail=True)
    assert store.get("stage", "k1") is None
    assert list((tmp_path / "stage").iterdir()) == []
    assert _write(store).read("numbers").height == 3  # a rerun completes


def test_crash_between_write_and_rename_leaves_no_artifact(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    real_replace = os.replace

    def crash_on_folder_rename(src, dst):
        if str(dst).endswith("/stage/k1"):
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_folder_rename)
    with pytest.raises(OSError):
        _write(store)
    assert store.get("stage", "k1") is None
    monkeypatch.setattr(os, "replace", real_replace)
    assert _write(store).read("numbers").height == 3


def test_folder_without_complete_manifest_is_not_trusted(tmp_path):
    store = ArtifactStore(tmp_path)
    folder = tmp_path / "stage" / "k1" / "numbers"
    folder.mkdir(parents=True)
    pl.DataFrame({"n": [1]}).write_parquet(folder / "part-0.parquet")
    assert store.get("stage", "k1") is None
    assert _write(store).read("numbers").height == 3  # replaced by a complete one


def test_deleted_table_file_makes_artifact_absent(tmp_path):
    store = ArtifactStore(tmp_path)
    artifact = _write(store)
    (Path(artifact.path) / "numbers" / "part-0.parquet").unlink()
    assert store.get("stage", "k1") is None


def test_existing_artifact_is_kept_unless_replaced(tmp_path):
    store = ArtifactStore(tmp_path)
    _write(store, rows=3)
    assert _write(store, rows=5).read("numbers").height == 3
    with store.writer("stage", "k1", code="c1", config={}, inputs={}, replace=True) as writer:
        writer.write_table("numbers", pl.DataFrame({"n": [9]}))
    assert store.require("stage", "k1").read("numbers")["n"].to_list() == [9]


def test_key_changes_with_config_inputs_sources_code_and_stage():
    base = artifact_key("s", "c", {"a": 1, "b": [1, 2]}, {"in": "d"}, {"f": "h"})
    assert base == artifact_key("s", "c", {"b": [1, 2], "a": 1}, {"in": "d"}, {"f": "h"})  # order does not matter
    assert base != artifact_key("s", "c", {"a": 2, "b": [1, 2]}, {"in": "d"}, {"f": "h"})
    assert base != artifact_key("s", "c", {"a": 1, "b": [1, 2]}, {"in": "d2"}, {"f": "h"})
    assert base != artifact_key("s", "c", {"a": 1, "b": [1, 2]}, {"in": "d"}, {"f": "h2"})
    assert base != artifact_key("s", "c2", {"a": 1, "b": [1, 2]}, {"in": "d"}, {"f": "h"})
    assert base != artifact_key("t", "c", {"a": 1, "b": [1, 2]}, {"in": "d"}, {"f": "h"})


def test_registered_file_must_be_written(tmp_path):
    store = ArtifactStore(tmp_path)
    with (
        pytest.raises(ArtifactError, match="never written"),
        store.writer("stage", "k", code="c1", config={}, inputs={}) as writer,
    ):
        writer.file_path("model.pt")
    assert store.get("stage", "k") is None


def test_conform_names_missing_column():
    schema = pa.schema([("a", pa.string()), ("b", pa.int32())])
    with pytest.raises(ArtifactError, match=r"t: missing columns \['b'\]"):
        conform(pa.table({"a": ["x"]}), schema, "t")
    assert conform(pa.table({"b": [1], "a": ["x"]}), schema, "t").schema == schema


def test_a_wrong_path_is_not_a_transient_error_but_a_disk_hiccup_is():
    from tasks.common import is_transient

    assert not is_transient(FileNotFoundError("no such file: /data/x.json"))
    assert not is_transient(PermissionError("denied"))
    assert is_transient(OSError("disk hiccup")) and is_transient(TimeoutError())
    assert not is_transient(ValueError("bad input"))
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES):  # a full disk or a read-only root does not heal
        assert not is_transient(OSError(code, os.strerror(code)))
    assert is_transient(OSError(errno.EIO, "I/O error"))


def test_a_write_that_fails_on_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    from storage import fs

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        fs.write_atomic(tmp_path / "_runs" / "run.parquet", b"rows")
    assert list((tmp_path / "_runs").iterdir()) == []


def test_the_sweep_removes_only_temp_files_of_dead_writers(tmp_path):
    import subprocess
    import sys

    from storage.fs import sweep_stale_temp_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    cache = tmp_path / "_embedding_cache" / "text"
    cache.mkdir(parents=True)
    orphan = cache / f"part-1.parquet.{dead_pid}-0123abcd.tmp"  # its writer was killed mid-write
    live = cache / f"part-2.parquet.{os.getppid()}-0123abcd.tmp"  # another run, still writing
    young = cache / f"part-3.parquet.{dead_pid}-4567abcd.tmp"  # maybe another machine's, seconds old
    other = cache / "notes.tmp"  # not ours: no writer named
    for path in (orphan, live, young, other):
        path.write_bytes(b"partial")
    old = os.path.getmtime(orphan) - 3600
    for path in (orphan, live, other):
        os.utime(path, (old, old))
    assert sweep_stale_temp_files(tmp_path) == 1
    assert not orphan.exists() and live.exists() and young.exists() and other.exists()


def test_a_table_of_many_parts_reads_back_in_written_order(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writer("stage", "k", code="c", config={}, inputs={}) as writer:
        for part in range(12):  # part-10 and part-11 sort before part-2 as strings
            writer.write_table("numbers", pl.DataFrame({"n": [2 * part, 2 * part + 1]}))
    artifact = store.require("stage", "k")
    assert artifact.read("numbers")["n"].to_list() == list(range(24))
    assert [Path(p).name for p in artifact.parts("numbers")][-3:] == ["part-9.parquet", "part-10.parquet",
                                                                       "part-11.parquet"]


def test_a_table_can_be_read_for_some_of_its_columns(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writer("stage", "k", code="c", config={}, inputs={}) as writer:
        writer.write_table("pairs", pl.DataFrame({"a": [1, 2], "b": ["x", "y"]}))
    assert store.require("stage", "k").read("pairs", columns=["b"]).to_dict(as_series=False) == {"b": ["x", "y"]}


def test_a_copied_part_is_counted_from_its_footer_and_a_non_parquet_file_is_refused(tmp_path):
    store = ArtifactStore(tmp_path)
    source = _write(store, rows=4)
    with store.writer("stage", "k2", code="c", config={}, inputs={}) as writer:
        writer.copy_part("numbers", lambda path: path.write_bytes(Path(source.parts("numbers")[0]).read_bytes()))
        writer.write_table("numbers", pl.DataFrame({"n": [9]}))
    copied = store.require("stage", "k2")
    assert copied.tables == {"numbers": 5} and copied.read("numbers")["n"].to_list() == [0, 1, 2, 3, 9]
    with pytest.raises(Exception, match="Parquet"), store.writer("stage", "k3", code="c", config={}, inputs={}) as w:
        w.copy_part("numbers", lambda path: path.write_bytes(b"not parquet"))
    assert store.get("stage", "k3") is None


def _hashes_on_require(store, monkeypatch) -> int:
    hashed = []
    real = store.fsx.sha256
    monkeypatch.setattr(store.fsx, "sha256", lambda path: hashed.append(path) or real(path))
    store.require("stage", "k1")
    monkeypatch.setattr(store.fsx, "sha256", real)
    return len(hashed)


def test_the_writer_vouches_for_the_files_it_hashed_so_the_first_reader_does_not_hash_them(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "RACY_NS", 0)  # every file counts as written long enough ago
    store = ArtifactStore(tmp_path)
    _write(store, read=False)
    assert _hashes_on_require(store, monkeypatch) == 0
    part = Path(store.path("stage", "k1")) / "numbers" / "part-0.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x40
    part.write_bytes(bytes(data))
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 1))  # whatever the clock's tick
    assert store.get("stage", "k1") is None  # a change the stat shows is hashed and caught


def test_files_written_within_the_clock_tick_are_left_for_the_reader_to_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "RACY_NS", 10**18)  # every file counts as just written
    store = ArtifactStore(tmp_path)
    _write(store, read=False)
    assert _hashes_on_require(store, monkeypatch) == 1  # hashed once, then in the stat cache
    assert _hashes_on_require(store, monkeypatch) == 0
