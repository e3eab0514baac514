"""Open the artifact store and run log for a flow run."""

from __future__ import annotations

import uuid

from prefect.runtime import flow_run

from kgmel_core.config import PipelineConfig
from storage import ArtifactStore, RunLog
from tasks.common import PipelineContext


def open_context(config: PipelineConfig, flow_name: str) -> PipelineContext:
    store = ArtifactStore(config.artifacts)
    store.sweep_temporaries()
    run_id = str(flow_run.get_id() or uuid.uuid4())
    run_log = RunLog(store, run_id, flow_name, model=config.model)
    return PipelineContext(store=store, run_log=run_log, force_stages=set(config.force_stages))
