"""The offline default LLM: a GGUF model from PyPI chunk packages, served by llama.cpp (xllamacpp) on
127.0.0.1 with an OpenAI-compatible chat API and the model's own chat template, reached through LiteLLM
like any provider.

The packaged model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), is instruction-tuned and text-only: it
gets the same chat prompts a hosted model gets, without images. On CPU every generated token costs
a full pass over the weights, so prompts and answers are kept short and the server reuses the KV
cache of a shared prompt prefix (`cache_prompt`) across calls.

Its threads must not outnumber the cores it gets: llama.cpp's threads meet at a barrier after every
operation, so one thread that shares its core with another busy process stalls them all (a call
that takes 2 s on an idle machine took 15-20 s beside one busy process with 2 threads, 4 s with 1).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kgmel_core.packaged import QWEN25_CODER_1_5B, model_file

log = logging.getLogger(__name__)
LOCAL_MODEL = QWEN25_CODER_1_5B
LOCAL_MODEL_NAME = LOCAL_MODEL.name


def free_cores(sample_s: float = 0.5) -> int:
    """The cores this process may use that no other process is keeping busy right now (at least 1).

    Sampled once, when the server starts: a job that starts later is not seen, which is what
    `llm.threads` is for."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = psutil.cpu_percent(interval=sample_s) / 100 * (psutil.cpu_count() or usable)
    return max(1, min(usable, round(usable - busy)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_llm_server(
    model_path: Path | None = None,
    n_ctx_per_slot: int = 4096,
    parallel: int = 1,
    threads: int | None = None,
    verbosity: int = 0,
) -> Iterator[str]:
    """Serve the model on 127.0.0.1 for the duration of the block; yields the api_base (`.../v1`)."""
    try:
        import xllamacpp
    except ImportError as exc:
        raise ImportError("the local LLM needs the 'llm-local' extra: pip install 'kgmel[llm-local]'") from exc
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path or model_file(LOCAL_MODEL))
    params.port = _free_port()
    params.hostnames = ["127.0.0.1"]
    params.n_parallel = parallel
    params.n_ctx = n_ctx_per_slot * parallel  # llama.cpp splits the context across the slots
    params.cpuparams.n_threads = threads or free_cores()
    params.cpuparams_batch.n_threads = params.cpuparams.n_threads
    params.cache_prompt = True  # reuse the KV cache of a prompt prefix a slot has already read
    params.verbosity = verbosity  # llama.cpp logs every slot event at the default level
    server = xllamacpp.Server(params)
    api_base = f"http://127.0.0.1:{params.port}/v1"
    log.info("local LLM %s serving on %s (%d threads, %d slots)", LOCAL_MODEL_NAME, api_base,
             params.cpuparams.n_threads, parallel)
    try:
        yield api_base
    finally:
        del server
