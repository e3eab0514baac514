"""The artifact store: content-keyed Parquet artifacts, atomic writes, and the DuckDB catalog."""

from storage.catalog import Catalog
from storage.runs import RunLog, StageRecord
from storage.store import Artifact, ArtifactError, ArtifactStore, artifact_key, file_sha256

__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactStore",
    "Catalog",
    "RunLog",
    "StageRecord",
    "artifact_key",
    "file_sha256",
]
