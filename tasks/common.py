"""What every stage task shares: look up its artifact by key, build it only when missing, log it.

Prefect's own result cache is off for every task (`NO_CACHE`): skipping is decided here, by the
artifact store's content keys (stage, code identity, config, input digests), which stay correct
when inputs change and change back, and by verifying the artifact's files before trusting it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from storage import Artifact, ArtifactStore, Catalog, InputRef, RunLog, StageRecord, artifact_key, code_digest
from storage.store import ArtifactWriter


class StageFailed(RuntimeError):
    """A stage could not build its artifact; the message names stage, key and cause."""


# Errors that may pass if tried again. A missing or unreadable file is not one of them: retrying a
# wrong path only delays the message that names it.
TRANSIENT_ERRORS = (OSError, TimeoutError, ConnectionError, MemoryError)
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# A full disk, a read-only file system, a quota: a retry seconds later meets the same wall (EACCES and
# EPERM arrive as PermissionError, above).
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return False
    return isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, PERMANENT_OS_ERRORS)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry I/O-like failures; a bad input or a bug fails at once."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    except Exception as exc:
        return is_transient(exc)
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
    distributed: bool = False  # the flow runs on a DaskTaskRunner: map parallel steps (tasks.parallel)
    shards: int = 1  # how many shards a parallel step is cut into

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog(self.store)


def logger():
    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("kgmel")


def _reattempt(existing: Artifact, max_attempts: int | None) -> int | None:
    """The attempt number to build an artifact with failed LLM calls again (None: it stands)."""
    stats = existing.manifest.get("stats", {})
    failed, attempt = int(stats.get("calls_failed", 0) or 0), int(stats.get("attempt", 1) or 1)
    return attempt + 1 if failed and max_attempts and attempt < max_attempts else None


def _record_outcome(ctx: PipelineContext, record: StageRecord) -> None:
    """A failed stage's record, written where possible. On a full disk its write fails too: the stage's
    own error must still be the one raised, so this one is logged (the record stays in memory, where
    the run summary reads it) instead of replacing it."""
    try:
        ctx.run_log.add(record)
    except OSError as exc:
        logger().error("stage %s %s (%s); its run-log record could not be written: %s",
                       record.stage, record.status, record.error, exc)


def run_stage(
    ctx: PipelineContext,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, Artifact | None],
    build: Callable[[ArtifactWriter], None],
    *,
    sources: Mapping[str, str] | None = None,
    max_attempts: int | None = None,
) -> Artifact:
    """Return the stage's artifact, building it with `build(writer)` unless a trusted one exists.

    `inputs` are the artifacts the stage reads (None: not used); `sources` the content hashes of
    files it reads directly. The key also covers the code that builds the stage: the module where
    `build` is defined and the project modules it imports. `max_attempts`: an artifact that
    recorded failed LLM calls is built again (the answer cache serves every earlier success) until
    it has no failures or has been attempted that many times.
    """
    used = {name: artifact for name, artifact in inputs.items() if artifact is not None}
    code = code_digest(build.__module__)
    key = artifact_key(stage, code, config, {n: a.digest for n, a in used.items()}, sources or {})
    log = logger()
    started = time.perf_counter()
    existing = ctx.store.get(stage, key)
    note, attempt = None, 1
    if existing is not None:
        retry = _reattempt(existing, max_attempts)
        if stage in ctx.force_stages:
            note = "forced rebuild"
        elif retry is not None:
            attempt = retry
            failed = existing.manifest["stats"]["calls_failed"]
            note = f"{failed} failed LLM calls re-attempted ({attempt}/{max_attempts})"
        else:
            log.info("stage %s: artifact %s verified, skipped (cache hit)", stage, key)
            ctx.run_log.add(StageRecord(stage, key, True, existing.rows, 0.0))
            ctx.catalog.refresh()
            return existing
    elif ctx.store.exists(stage, key):
        note = "rebuilt: the stored copy failed verification"
    log.info("stage %s: building artifact %s%s", stage, key, f" ({note})" if note else "")
    try:
        with ctx.store.writer(
            stage,
            key,
            code=code,
            config=config,
            inputs={n: InputRef.of(a) for n, a in used.items()},
            sources=sources,
            replace=existing is not None,
        ) as writer:
            writer.stats["attempt"] = attempt
            build(writer)
    except Exception as exc:
        seconds = time.perf_counter() - started
        _record_outcome(ctx, StageRecord(stage, key, False, 0, seconds, "failed", f"{type(exc).__name__}: {exc}", note))
        raise StageFailed(f"stage {stage!r} (artifact key {key}) failed: {type(exc).__name__}: {exc}") from exc
    except BaseException as exc:  # SIGTERM (Prefect's TerminationSignal), Ctrl-C: the run log says so too
        seconds = time.perf_counter() - started
        _record_outcome(ctx, StageRecord(stage, key, False, 0, seconds, "interrupted", type(exc).__name__, note))
        raise
    artifact = ctx.store.require(stage, key)
    seconds = time.perf_counter() - started
    failed = int(artifact.manifest["stats"].get("calls_failed", 0) or 0)
    if failed:
        log.warning("stage %s: %d LLM calls failed (attempt %d%s); their mentions fell back and are counted",
                    stage, failed, attempt, f" of {max_attempts}" if max_attempts else "")
    log.info("stage %s: wrote %s in %.1fs (%s)", stage, key, seconds, artifact.tables)
    ctx.run_log.add(StageRecord(stage, key, False, artifact.rows, seconds, note=note))
    ctx.catalog.refresh()
    return artifact
