"""Per-encoder cache of embeddings keyed by content hash (text sha or image sha256).

The embed stage asks the cache first and encodes only what it lacks, so re-indexing a KB where a
few entities changed encodes those few strings and images, not the whole KB. New vectors are
encoded and written in chunks, each one Parquet part written atomically, so a crash (or a kill)
half-way through a 100k-string KB loses at most the chunk being encoded, and the re-run resumes.
A part that cannot be read is moved aside and its vectors are encoded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
from tqdm.auto import tqdm

from kgmel_core.schemas import vector_column, vector_matrix
from storage.store import QUARANTINE_DIR, ArtifactStore, write_parquet_atomic

log = logging.getLogger(__name__)
CHUNK = 1024


class EmbeddingCache:
    def __init__(self, store: ArtifactStore, encoder_identity: str, modality: str, chunk: int = CHUNK):
        digest = hashlib.sha256(encoder_identity.encode()).hexdigest()[:16]
        self.store = store
        self.folder = store.root / "_embedding_cache" / digest / modality
        self.folder.mkdir(parents=True, exist_ok=True)
        self.chunk = chunk
        (self.folder.parent / "encoder.txt").write_text(encoder_identity + "\n")

    def _parts(self) -> list:
        parts = sorted(self.folder.glob("*.parquet"))
        readable = []
        for part in parts:
            try:
                pl.scan_parquet(part, glob=False).select(pl.len()).collect()
                readable.append(part)
            except Exception as exc:
                target = self.store.root / QUARANTINE_DIR / "_embedding_cache" / f"{uuid.uuid4().hex[:8]}-{part.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, target)
                log.warning("embedding cache part %s unreadable (%s): moved to %s, its vectors are re-encoded",
                            part, exc, target)
        return readable

    def _load(self, wanted: set[str]) -> dict[str, np.ndarray]:
        parts = self._parts() if wanted else []
        if not parts:
            return {}
        frame = pl.scan_parquet(parts, glob=False).filter(pl.col("sha").is_in(list(wanted))).unique("sha").collect()
        if frame.height == 0:
            return {}
        vectors = vector_matrix(frame["vector"])
        return dict(zip(frame["sha"].to_list(), vectors, strict=True))

    def get_or_compute(
        self,
        shas: Sequence[str],
        compute: Callable[[list[int]], np.ndarray],
        desc: str = "embed",
        sizes: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, int]:
        """Vectors for `shas` (unique); `compute(positions)` encodes the missing ones, a chunk at a time.

        `sizes` (e.g. text lengths): the missing items are encoded in that order, so each chunk holds
        items of similar length and a transformer pads little (a chunk of long sentences beside
        one-word tails otherwise pads every tail to the longest sentence).
        Returns (matrix aligned with shas, number of vectors computed now).
        """
        cached = self._load(set(shas))
        missing = [i for i, sha in enumerate(shas) if sha not in cached]
        if sizes is not None:
            missing.sort(key=lambda i: sizes[i])
        bar = tqdm(total=len(missing), desc=desc, unit="item", disable=len(missing) <= self.chunk)
        for start in range(0, len(missing), self.chunk):
            positions = missing[start : start + self.chunk]
            vectors = compute(positions)
            table = pa.table(
                {"sha": pa.array([shas[i] for i in positions], pa.string()), "vector": vector_column(vectors)}
            )
            write_parquet_atomic(table, self.folder / f"part-{uuid.uuid4().hex}.parquet")
            cached.update(zip((shas[i] for i in positions), vectors, strict=True))
            bar.update(len(positions))
        bar.close()
        if not shas:
            return np.zeros((0, 0), np.float32), 0
        return np.stack([cached[sha] for sha in shas]).astype(np.float32, copy=False), len(missing)
