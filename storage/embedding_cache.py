"""Per-encoder cache of embeddings keyed by content hash (text sha or image sha256).

The embed stage asks the cache first and encodes only what it lacks, so re-indexing a KB where a
few entities changed encodes those few strings and images, not the whole KB. Each batch of new
vectors is one Parquet part written atomically; a crash loses at most the batch being written.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from kgmel_core.schemas import vector_column, vector_matrix
from storage.store import ArtifactStore, write_parquet_atomic


class EmbeddingCache:
    def __init__(self, store: ArtifactStore, encoder_identity: str, modality: str):
        digest = hashlib.sha256(encoder_identity.encode()).hexdigest()[:16]
        self.folder = store.root / "_embedding_cache" / digest / modality
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder.parent / "encoder.txt").write_text(encoder_identity + "\n")

    def _load(self, wanted: set[str]) -> dict[str, np.ndarray]:
        parts = sorted(self.folder.glob("*.parquet"))
        if not parts or not wanted:
            return {}
        frame = pl.scan_parquet(parts).filter(pl.col("sha").is_in(list(wanted))).unique("sha").collect()
        if frame.height == 0:
            return {}
        vectors = vector_matrix(frame["vector"])
        return dict(zip(frame["sha"].to_list(), vectors, strict=True))

    def get_or_compute(self, shas: Sequence[str], compute: Callable[[list[int]], np.ndarray]) -> tuple[np.ndarray, int]:
        """Vectors for `shas` (unique); `compute(positions)` encodes the missing ones.

        Returns (matrix aligned with shas, number of vectors computed now).
        """
        cached = self._load(set(shas))
        missing = [i for i, sha in enumerate(shas) if sha not in cached]
        computed = compute(missing) if missing else None
        if computed is not None and len(missing):
            table = pa.table(
                {
                    "sha": pa.array([shas[i] for i in missing], pa.string()),
                    "vector": vector_column(computed),
                }
            )
            write_parquet_atomic(table, self.folder / f"part-{uuid.uuid4().hex}.parquet")
        if not shas:
            return np.zeros((0, 0), np.float32), 0
        dim = computed.shape[1] if computed is not None else next(iter(cached.values())).shape[0]
        out = np.empty((len(shas), dim), np.float32)
        missing_pos = {pos: j for j, pos in enumerate(missing)}
        for i, sha in enumerate(shas):
            out[i] = computed[missing_pos[i]] if i in missing_pos else cached[sha]
        return out, len(missing)
