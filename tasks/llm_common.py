"""What the LLM stages share: calling the configured model (in process, or from Dask workers), the
artifact-key view of its settings, and the `llm_calls` table with its counts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from kgmel_core import schemas
from kgmel_core.config import LLMConfig
from kgmel_core.llm.client import LLMRequest, LLMResult
from kgmel_core.llm.open import open_llm
from tasks.common import PipelineContext
from tasks.parallel import map_shards


def run_llm_batch(config: LLMConfig, stage: str, cache_dir: str, requests: list[LLMRequest]) -> list[LLMResult]:
    """One batch of calls to a remote provider with its own client (a Dask worker's share)."""
    with open_llm(config, stage, Path(cache_dir)) as (client, _):
        return client.run(requests, progress=False)


def ask_llm(
    ctx: PipelineContext,
    config: LLMConfig,
    stage: str,
    build: Callable[[bool], list[LLMRequest]],
    grammar: str | None = None,
) -> tuple[list[LLMResult], str, bool]:
    """(results in request order, model, images sent) for the requests `build(send_images)` makes.

    The packaged local model answers in this process (one llama.cpp server), held to `grammar` when
    one is given; a remote provider is called from the Dask workers in batches with `runner: dask`
    (the answer cache is shared)."""
    if config.model == "local" or not ctx.distributed:
        with open_llm(config, stage, ctx.store.root / "_llm_cache", grammar) as (client, send_images):
            return client.run(build(send_images)), client.model, send_images
    send_images = config.vision != "no"
    requests = build(send_images)
    batches = [requests[i :: ctx.shards] for i in range(ctx.shards) if requests[i :: ctx.shards]]
    cache_dir = str(ctx.store.root / "_llm_cache")
    answered = map_shards(True, run_llm_batch, [(config, stage, cache_dir, batch) for batch in batches])
    by_key = {result.key: result for batch in answered for result in batch}
    return [by_key[r.key] for r in requests], config.model, send_images


def calls_table(results) -> pl.DataFrame:
    return pl.DataFrame([r.call for r in results], schema=pl.Schema(schemas.LLM_CALLS))


def call_stats(calls: pl.DataFrame) -> dict:
    return {
        "calls": calls.height,
        "calls_cached": int(calls["cached"].sum()),
        "calls_failed": int((calls["status"] != "ok").sum()),
        "calls_cut_at_max_tokens": int((calls["finish_reason"] == "length").sum()),
        "tokens_in": int(calls["tokens_in"].sum()),
        "tokens_out": int(calls["tokens_out"].sum()),
    }
