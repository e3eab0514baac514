"""Opens a stage's LLM client: a hosted provider through LiteLLM, or the packaged local model's server.

Kept apart from `kgmel_core.factory` on purpose: an artifact key includes the code of every module
its stage imports, and the factory imports the retrieval models, which stage 1 never runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from kgmel_core.config import LLMConfig
from kgmel_core.llm.client import LLMClient


@contextmanager
def open_llm(
    config: LLMConfig, stage: str, cache_dir: Path | None, grammar: str | None = None,
    top_logprobs: int | None = None,
) -> Iterator[tuple[LLMClient, bool]]:
    """A client for the configured model, and whether images are sent. `model: local` starts the packaged
    model's llama.cpp server for the duration of the block (text-only: it never gets an image) and holds
    its answers to `grammar`; hosted providers take no GBNF grammar and get the prompt alone. `top_logprobs`:
    see `LLMClient`."""
    if config.model != "local":
        with closing(LLMClient(config, stage, cache_dir, top_logprobs=top_logprobs)) as client:
            yield client, config.vision != "no"
        return
    if config.vision == "yes":
        raise ValueError("llm.vision=yes, but the packaged local model is text-only; use a VLM provider")
    from kgmel_core.llm.local import LOCAL_MODEL, LOCAL_MODEL_NAME, local_llm_server

    with local_llm_server(parallel=config.calls_at_once, threads=config.threads) as api_base, closing(LLMClient(
        config, stage, cache_dir, api_base=api_base, model=f"openai/{LOCAL_MODEL_NAME}",
        extra_body={"cache_prompt": True}, served_by=f"packaged:{LOCAL_MODEL.file_name}:{LOCAL_MODEL.sha256}",
        grammar=grammar, top_logprobs=top_logprobs,
    )) as client:
        yield client, False
