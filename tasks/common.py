"""What every stage task shares: look up its artifact by key, build it only when missing, log it.

Prefect's own result cache is off for every task (`NO_CACHE`): skipping is decided here, by the
artifact store's content keys, which stay correct when inputs change and change back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from storage import Artifact, ArtifactStore, Catalog, RunLog, StageRecord, artifact_key
from storage.store import ArtifactWriter


class StageFailed(RuntimeError):
    """A stage could not build its artifact; the message names stage, key and cause."""


TRANSIENT_ERRORS = (OSError, TimeoutError, ConnectionError, MemoryError)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry I/O-like failures; a bad input or a bug fails at once."""
    try:
        state.result()
    except StageFailed as exc:
        return isinstance(exc.__cause__, TRANSIENT_ERRORS)
    except TRANSIENT_ERRORS:
        return True
    except Exception:
        return False
    return False


# Shared by every stage task: Prefect's result cache off (the store decides), transient retries.
STAGE_TASK = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_if_transient,
}


@dataclass
class PipelineContext:
    store: ArtifactStore
    run_log: RunLog
    force_stages: set[str] = field(default_factory=set)

    @property
    def catalog(self) -> Catalog:
        return Catalog(self.store)


def logger():
    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("kgmel")


def input_keys(**artifacts: Artifact | None) -> dict[str, str]:
    """The `inputs` of a stage key: each given artifact's key by name; absent (None) ones are left out."""
    return {name: artifact.key for name, artifact in artifacts.items() if artifact is not None}


def run_stage(
    ctx: PipelineContext,
    stage: str,
    version: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    build: Callable[[ArtifactWriter], None],
) -> Artifact:
    """Return the stage's artifact, building it with `build(writer)` unless it already exists."""
    key = artifact_key(stage, version, config, inputs)
    log = logger()
    started = time.perf_counter()
    existing = ctx.store.get(stage, key)
    if existing is not None and stage not in ctx.force_stages:
        log.info("stage %s: artifact %s exists, skipped (cache hit)", stage, key)
        ctx.run_log.add(StageRecord(stage, key, True, _rows(existing), 0.0))
        ctx.catalog.publish(existing)
        return existing
    log.info("stage %s: building artifact %s", stage, key)
    try:
        forced = existing is not None
        with ctx.store.writer(stage, key, config=config, inputs=inputs, version=version, replace=forced) as writer:
            build(writer)
    except Exception as exc:
        seconds = time.perf_counter() - started
        ctx.run_log.add(StageRecord(stage, key, False, 0, seconds, "failed", f"{type(exc).__name__}: {exc}"))
        raise StageFailed(f"stage {stage!r} (artifact key {key}) failed: {type(exc).__name__}: {exc}") from exc
    artifact = ctx.store.require(stage, key)
    seconds = time.perf_counter() - started
    log.info("stage %s: wrote %s in %.1fs (%s)", stage, key, seconds, artifact.manifest["tables"])
    ctx.run_log.add(StageRecord(stage, key, False, _rows(artifact), seconds))
    ctx.catalog.publish(artifact)
    return artifact


def _rows(artifact: Artifact) -> int:
    return int(sum(artifact.manifest["tables"].values()))
