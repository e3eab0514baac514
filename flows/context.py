"""Open the artifact store and run log for a flow run."""

from __future__ import annotations

import uuid

from prefect.runtime import flow_run

from kgmel_core.config import PipelineConfig
from storage import ArtifactStore, RunLog
from tasks.common import PipelineContext


def open_context(config: PipelineConfig, flow_name: str) -> PipelineContext:
    store = ArtifactStore(config.artifacts, config.artifacts_options)
    store.sweep_temporaries()
    run_id = str(flow_run.get_id() or uuid.uuid4())
    run_log = RunLog(store, run_id, flow_name, model=config.model)
    distributed = config.runner == "dask"
    shards = (config.dask.shards or 2 * config.dask.n_workers) if distributed else 1
    return PipelineContext(store, run_log, set(config.force_stages), distributed, shards)
