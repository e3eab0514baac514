import hashlib

import pytest

from kgmel_core.llm import packaged
from kgmel_core.llm.packaged import PackagedModel, PackagedModelError, join_parts, model_file, part_files, verified


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
