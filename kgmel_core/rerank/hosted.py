"""Stage 3 with a hosted reranker: LiteLLM's rerank API (Cohere's request and response, which Jina,
Voyage and infinity/TEI-style servers speak too) scores each mention's candidates, as chat models plug
into the LLM method through LiteLLM's completion API.

A provider error never stops the stage: the mention keeps retrieval's order, the call is recorded with
its error, and the mention is counted as a fallback.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from kgmel_core.config import RerankAPIConfig
from kgmel_core.rerank.cross_encoder import RerankGroup


def _call_row(group: RerankGroup, config: RerankAPIConfig, seconds: float, error: str | None) -> dict:
    prompt = group.mention_text + "\x00" + "\x00".join(group.candidate_texts)
    return {
        "call_id": uuid.uuid4().hex, "stage": "rerank", "model": config.model,
        "prompt_hash": hashlib.sha256(prompt.encode()).hexdigest()[:16], "tokens_in": 0, "tokens_out": 0,
        "latency_s": seconds, "status": "ok" if error is None else "error", "error": error, "cached": False,
        "attempts": 1 + config.retries if error else 1,
    }


def score_with_api(groups: Sequence[RerankGroup], config: RerankAPIConfig,
                   progress: bool = True) -> tuple[list[np.ndarray | None], list[dict]]:
    """The provider's relevance score of every candidate of each group (None where the call failed), and
    one `llm_calls` row per call."""
    import litellm

    litellm.suppress_debug_info = True  # its provider-list banner on every error says nothing here
    api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
    if api_key is None and config.api_base:  # a self-hosted server (infinity, TEI) takes no key, LiteLLM wants one
        api_key = "none"

    def one(group: RerankGroup) -> tuple[np.ndarray | None, dict]:
        started = time.perf_counter()
        try:
            response = litellm.rerank(
                model=config.model, query=group.mention_text, documents=list(group.candidate_texts),
                top_n=len(group.candidate_texts), return_documents=False, api_base=config.api_base,
                api_key=api_key, timeout=config.timeout_s, num_retries=config.retries,
            )
            scores = np.full(len(group.qids), -np.inf, np.float32)
            for result in response.results:
                scores[int(result["index"])] = float(result["relevance_score"])
            if np.isinf(scores).any():
                raise ValueError(f"the provider scored {int(np.isfinite(scores).sum())} of {len(scores)} candidates")
            return scores, _call_row(group, config, time.perf_counter() - started, None)
        except Exception as exc:  # a provider error is recorded and counted, never fatal
            error = f"{type(exc).__name__}: {exc}"[:500]
            return None, _call_row(group, config, time.perf_counter() - started, error)

    with ThreadPoolExecutor(config.concurrency) as pool:
        answered = list(tqdm(pool.map(one, groups), total=len(groups), desc="rerank (api)", unit="mention",
                             disable=not progress or len(groups) < 2))
    return [scores for scores, _ in answered], [row for _, row in answered]
