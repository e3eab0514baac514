"""The artifact store: content-keyed, verified Parquet artifacts, named models, and the DuckDB catalog."""

from storage.catalog import Catalog, QueryRefused
from storage.code_identity import code_digest
from storage.registry import ModelRegistry, RegistryError
from storage.runs import RunLog, StageRecord
from storage.store import (
    Artifact,
    ArtifactDamaged,
    ArtifactError,
    ArtifactStore,
    InputRef,
    artifact_key,
    file_sha256,
)

__all__ = [
    "Artifact",
    "ArtifactDamaged",
    "ArtifactError",
    "ArtifactStore",
    "Catalog",
    "InputRef",
    "ModelRegistry",
    "QueryRefused",
    "RegistryError",
    "RunLog",
    "StageRecord",
    "artifact_key",
    "code_digest",
    "file_sha256",
]
