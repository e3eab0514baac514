"""What the LLM stages share: the client for a configured model (starting the packaged local one), the
mention scope, and the `llm_calls` table with its counts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import polars as pl

from kgmel_core import schemas
from kgmel_core.config import LLMConfig, LLMScope
from kgmel_core.llm.client import LLMClient
from kgmel_core.llm.local import LOCAL_MODEL_NAME, local_llm_server
from tasks.common import PipelineContext

# Settings that change how calls are made, not what they answer: kept out of artifact keys.
_RUNTIME_ONLY = {"timeout_s", "retries", "backoff_s", "concurrency", "max_stage_attempts"}


def llm_key_config(config: LLMConfig) -> dict:
    return config.model_dump(exclude=_RUNTIME_ONLY)


def text_mode(config: LLMConfig) -> bool:
    return config.api == "text" or (config.api == "auto" and config.model == "local")


@contextmanager
def llm_client(
    ctx: PipelineContext, config: LLMConfig, stage: str, stop: list[str]
) -> Iterator[tuple[LLMClient, bool]]:
    """A client for the configured model, plus whether images are sent. `local` starts the packaged
    model's server for the duration of the stage."""
    cache_dir = ctx.store.root / "_llm_cache"
    as_text = text_mode(config)
    if config.model == "local":
        if config.vision == "yes":
            raise ValueError("llm.vision=yes, but the packaged local model is text-only; use a VLM provider")
        with local_llm_server(parallel=min(config.concurrency, 4)) as api_base:
            prefix = "text-completion-openai" if as_text else "openai"
            client = LLMClient(
                config,
                stage,
                cache_dir,
                api_base=api_base,
                model=f"{prefix}/{LOCAL_MODEL_NAME}",
                text_mode=as_text,
                stop=stop,
            )
            try:
                yield client, False
            finally:
                client.close()
    else:
        client = LLMClient(config, stage, cache_dir, text_mode=as_text, stop=stop)
        try:
            yield client, config.vision != "no" and not as_text
        finally:
            client.close()


def in_scope(mentions: pl.DataFrame, scope: LLMScope) -> pl.DataFrame:
    chosen = mentions if scope.splits is None else mentions.filter(pl.col("split").is_in(scope.splits))
    chosen = chosen.sort("mention_id")
    return chosen.head(scope.max_mentions) if scope.max_mentions else chosen


def calls_table(results) -> pl.DataFrame:
    return pl.DataFrame([r.call for r in results], schema=pl.Schema(schemas.LLM_CALLS))


def call_stats(calls: pl.DataFrame) -> dict:
    return {
        "calls": calls.height,
        "calls_cached": int(calls["cached"].sum()),
        "calls_failed": int((calls["status"] != "ok").sum()),
        "tokens_in": int(calls["tokens_in"].sum()),
        "tokens_out": int(calls["tokens_out"].sum()),
    }
