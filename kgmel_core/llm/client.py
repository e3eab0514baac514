"""One LiteLLM client for every LLM/VLM call of the pipeline.

Bounded concurrency, a per-call time limit (`asyncio.wait_for`: LiteLLM's own `timeout=` is not
enforced for every provider), retries with exponential back-off on transient errors only (tenacity;
a call waiting to retry gives its concurrency slot to others), and a disk cache keyed by
(model, server, messages, params) so a re-run makes no call. Every call, cached or
failed, yields one `llm_calls` row. A failed call is a recorded result, never an exception: the
stages decide what a failure means (a recorded parse failure, a retrieval fallback).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import mimetypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential
from tqdm.auto import tqdm

from kgmel_core.config import LLMConfig


@functools.cache
def _litellm() -> Any:
    """LiteLLM, imported on first use: importing it takes seconds, and most commands (`kgmel link`
    without an LLM, `status`, `query`) never make a call."""
    import litellm

    # httpx's own transport: LiteLLM's aiohttp transport leaves sessions open when an event loop ends.
    litellm.disable_aiohttp_transport = True
    return litellm


@functools.cache
def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth another try: the provider or network may recover. Anything else (bad request, auth,
    unknown model, a model without vision) fails at once with its message recorded."""
    errors = _litellm().exceptions
    return (errors.Timeout, errors.APIConnectionError, errors.RateLimitError, errors.ServiceUnavailableError,
            errors.InternalServerError, TimeoutError)


def image_data_url(path: str | Path) -> str:
    """OpenAI-style `image_url` payload; LiteLLM converts it for providers that want raw base64."""
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def prompt_hash(model: str, messages: list[dict], params: dict[str, Any]) -> str:
    payload = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class LLMRequest:
    key: str  # what the call is for (a mention id); ties the answer back to its row
    messages: list[dict]


@dataclass
class LLMResult:
    key: str
    text: str | None  # None when the call failed
    call: dict[str, Any] = field(default_factory=dict)  # the llm_calls row
    # With `top_logprobs`: the most likely first tokens of the answer and their log-probabilities, which
    # grade every option of a one-token answer (a candidate's number) instead of naming one.
    first_token: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.text is not None

    @property
    def truncated(self) -> bool:
        """The answer stopped at `max_tokens`: its last line may be cut short."""
        return self.call.get("finish_reason") == "length"


def first_token_logprobs(choice: Any) -> dict[str, float] | None:
    """token -> log-probability of the alternatives the provider gave for the answer's first token
    (None when it gave none: not asked, or a provider without logprobs)."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    first = content[0]
    alternatives = getattr(first, "top_logprobs", None) or [first]
    return {alt.token: float(alt.logprob) for alt in alternatives}


class LLMClient:
    def __init__(
        self,
        config: LLMConfig,
        stage: str,
        cache_dir: Path | None,
        api_base: str | None = None,
        model: str | None = None,
        extra_body: dict[str, Any] | None = None,
        served_by: str | None = None,
        grammar: str | None = None,
        top_logprobs: int | None = None,
    ):
        """`served_by`: what answers, for the cache key, where `api_base` does not say it – the packaged
        model's server binds a new port on every start, but serves the same model file. `grammar`: a
        llama.cpp GBNF grammar the server holds every answer to (only servers that take one).
        `top_logprobs`: ask for that many alternatives of each answer token (OpenAI's `logprobs`; the
        packaged llama.cpp server gives them) and keep the first token's in `LLMResult.first_token`."""
        self.config, self.stage = config, stage
        self.model = model or config.model
        self.api_base = api_base or config.api_base
        self.served_by = served_by or self.api_base
        self.api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self.params: dict[str, Any] = {"temperature": config.temperature, "max_tokens": config.max_tokens}
        self.extra_body = extra_body  # provider-specific request fields (llama.cpp: cache_prompt)
        if grammar is not None:  # it shapes the answer, so it is part of the cache key too
            self.params["grammar"] = grammar
        if top_logprobs is not None:
            self.params.update(logprobs=True, top_logprobs=top_logprobs)
        self.cache = diskcache.Cache(str(cache_dir)) if cache_dir else None

    def _kwargs(self, messages: list[dict]) -> dict[str, Any]:
        params = {name: value for name, value in self.params.items() if name != "grammar"}
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, **params, "num_retries": 0}
        extra_body = dict(self.extra_body or {})
        if "grammar" in self.params:
            extra_body["grammar"] = self.params["grammar"]
        if extra_body:
            kwargs["extra_body"] = extra_body
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self.api_key:
            kwargs["api_key"] = self.api_key
        elif self.api_base:
            kwargs["api_key"] = "not-needed"  # local OpenAI-compatible servers ignore it, the client wants one
        return kwargs

    async def _call(
        self, request: LLMRequest, limiter: asyncio.Semaphore, call: dict[str, Any]
    ) -> tuple[str, dict[str, float] | None]:
        """One attempt. Only the request itself holds a concurrency slot; back-off waits outside it."""
        async with limiter:
            call["attempts"] += 1
            started = time.perf_counter()
            try:
                response = await asyncio.wait_for(
                    _litellm().acompletion(**self._kwargs(request.messages)), self.config.timeout_s
                )
            except TimeoutError:  # asyncio's carries no message: say what timed out
                raise TimeoutError(f"no answer within timeout_s={self.config.timeout_s} s") from None
            finally:
                call["latency_s"] += time.perf_counter() - started
        choice = response.choices[0]
        usage = getattr(response, "usage", None)
        call.update(
            tokens_in=int(getattr(usage, "prompt_tokens", 0) or 0),
            tokens_out=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=choice.finish_reason,
        )
        return choice.message.content or "", first_token_logprobs(choice)

    async def _one(
        self, request: LLMRequest, limiter: asyncio.Semaphore, same_prompt: dict[str, asyncio.Lock]
    ) -> LLMResult:
        digest = prompt_hash(self.model, request.messages, {**self.params, "api_base": self.served_by})
        call = {
            "call_id": f"{self.stage}-{digest[:16]}",
            "stage": self.stage,
            "model": self.model,
            "prompt_hash": digest,
            "tokens_in": 0,
            "tokens_out": 0,
            "latency_s": 0.0,
            "status": "ok",
            "error": None,
            "cached": False,
            "attempts": 0,
            "finish_reason": None,
        }
        # One prompt asked twice in a run (mentions sharing sentence and surface form) reaches the provider
        # once: the later request waits for the earlier one and takes its answer from the cache.
        async with same_prompt.setdefault(digest, asyncio.Lock()):
            if self.cache is not None and (hit := self.cache.get(digest)) is not None:
                call.update(cached=True, tokens_in=hit["tokens_in"], tokens_out=hit["tokens_out"],
                            finish_reason=hit.get("finish_reason"))
                return LLMResult(request.key, hit["text"], call, hit.get("first_token"))
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self.config.retries + 1),
                wait=wait_exponential(multiplier=self.config.backoff_s, min=self.config.backoff_s),
                retry=retry_if_exception_type(transient_errors()),
                reraise=True,
            )
            try:
                text, first_token = await retrying(self._call, request, limiter, call)
            except Exception as exc:  # recorded, never raised: the stage decides what a failure means
                timeout = isinstance(exc, TimeoutError | _litellm().exceptions.Timeout)
                call.update(status="timeout" if timeout else "error", error=f"{type(exc).__name__}: {exc}"[:500])
                return LLMResult(request.key, None, call)
            if self.cache is not None:
                kept = {key: call[key] for key in ("tokens_in", "tokens_out", "finish_reason")}
                self.cache.set(digest, {"text": text, "first_token": first_token, **kept})
            return LLMResult(request.key, text, call, first_token)

    async def _all(self, requests: list[LLMRequest], progress: bool) -> list[LLMResult]:
        limiter = asyncio.Semaphore(self.config.calls_at_once)
        same_prompt: dict[str, asyncio.Lock] = {}
        bar = tqdm(total=len(requests), desc=f"{self.stage} LLM calls", unit="call", disable=not progress)

        async def tracked(request: LLMRequest) -> LLMResult:
            result = await self._one(request, limiter, same_prompt)
            bar.update(1)
            return result

        try:
            return list(await asyncio.gather(*(tracked(r) for r in requests)))
        finally:
            bar.close()
            # LiteLLM caches HTTP clients bound to this event loop: close and forget them before the
            # loop ends, so a later loop (the next stage) never reuses a dead one.
            await _litellm().close_litellm_async_clients()
            _litellm().in_memory_llm_clients_cache.flush_cache()

    def run(self, requests: list[LLMRequest], progress: bool = True) -> list[LLMResult]:
        """Run all requests (bounded concurrency); results in request order, one per request."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._all(requests, progress))
        # Called from inside an event loop (e.g. an async Prefect context): run in a worker thread.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._all(requests, progress)).result()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
