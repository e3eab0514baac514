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
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from kgmel_core.schemas import vector_column, vector_matrix
from storage.store import QUARANTINE_DIR, ArtifactStore

log = logging.getLogger(__name__)
CHUNK = 1024


class EmbeddingCache:
    def __init__(self, store: ArtifactStore, encoder_identity: str, modality: str, chunk: int = CHUNK):
        digest = hashlib.sha256(encoder_identity.encode()).hexdigest()[:16]
        self.fsx = store.fsx
        self.folder = self.fsx.join("_embedding_cache", digest, modality)
        self.chunk = chunk
        self.fsx.write_text_atomic(self.fsx.join("_embedding_cache", digest, "encoder.txt"), encoder_identity + "\n")

    def _parts(self) -> list[str]:
        names = [n for n in self.fsx.entries(self.folder, dirs=False) if n.endswith(".parquet")]
        parts = [self.fsx.under(self.folder, n) for n in names]
        readable = []
        for part in parts:
            try:
                pq.read_metadata(part, filesystem=None if self.fsx.local else self.fsx.fs)
                readable.append(part)
            except Exception as exc:
                name = f"{uuid.uuid4().hex[:8]}-{part.rsplit('/', 1)[-1]}"
                target = self.fsx.join(QUARANTINE_DIR, "_embedding_cache", name)
                self.fsx.move(part, target)
                log.warning("embedding cache part %s unreadable (%s): moved to %s, its vectors are re-encoded",
                            part, exc, target)
        return readable

    def _load(self, wanted: set[str]) -> dict[str, np.ndarray]:
        parts = self._parts() if wanted else []
        if not parts:
            return {}
        frame = pl.from_arrow(self.fsx.read_table(parts)).filter(pl.col("sha").is_in(list(wanted))).unique("sha")
        if frame.height == 0:
            return {}
        vectors = vector_matrix(frame["vector"])
        return dict(zip(frame["sha"].to_list(), vectors, strict=True))

    def get_or_compute(
        self,
        shas: Sequence[str],
        items: Sequence[Any],
        encode: Callable[[list[Any]], np.ndarray],
        desc: str = "embed",
        sizes: Sequence[int] | None = None,
        map_batches: Callable[[Callable, list[list[Any]]], list[np.ndarray]] | None = None,
        wave: int = 1,
    ) -> tuple[np.ndarray, int]:
        """Vectors for `shas` (unique; `items[i]` is what `shas[i]` hashes): the cached ones, and the
        missing ones from `encode(list of items)`, a chunk at a time.

        `sizes` (e.g. text lengths): the missing items are encoded in that order, so each chunk holds
        items of similar length and a transformer pads little. `map_batches(encode, chunks)` encodes
        `wave` chunks at once (on Dask workers); each chunk becomes a cache part as soon as it is back.
        Returns (matrix aligned with shas, number of vectors computed now).
        """
        cached = self._load(set(shas))
        missing = [i for i, sha in enumerate(shas) if sha not in cached]
        if sizes is not None:
            missing.sort(key=lambda i: sizes[i])
        chunks = [missing[i : i + self.chunk] for i in range(0, len(missing), self.chunk)]
        run = map_batches or (lambda fn, batches: [fn(batch) for batch in batches])
        bar = tqdm(total=len(missing), desc=desc, unit="item", disable=len(missing) <= self.chunk)
        for start in range(0, len(chunks), max(1, wave)):
            group = chunks[start : start + max(1, wave)]
            for positions, vectors in zip(group, run(encode, [[items[i] for i in p] for p in group]), strict=True):
                table = pa.table(
                    {"sha": pa.array([shas[i] for i in positions], pa.string()), "vector": vector_column(vectors)}
                )
                self.fsx.write_parquet_atomic(table, self.fsx.under(self.folder, f"part-{uuid.uuid4().hex}.parquet"))
                cached.update(zip((shas[i] for i in positions), vectors, strict=True))
                bar.update(len(positions))
        bar.close()
        if not shas:
            return np.zeros((0, 0), np.float32), 0
        return np.stack([cached[sha] for sha in shas]).astype(np.float32, copy=False), len(missing)
