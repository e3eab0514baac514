"""The embarrassingly parallel parts of stages, on the flow's task runner.

With `runner: dask` the flows run on Prefect's `DaskTaskRunner`; a stage hands its shards (dump
partitions, embedding batches, retrieval query batches, LLM call batches) to `map_shards`, which
maps them as Prefect task runs onto the Dask workers and returns the results in order. With the
local runner the shards run one after the other in the stage's own process (the CPU work inside
them is already multi-threaded by torch and FAISS). The stage itself, its key and its artifact stay
on the driver: workers compute, one publisher writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE


@task(name="shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def run_shard(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
    """One shard of a stage's work, wherever the task runner places it."""
    return fn(*args)


def map_shards(distributed: bool, fn: Callable[..., Any], shards: list[Sequence[Any]]) -> list[Any]:
    """`[fn(*args) for args in shards]`, on the Dask workers when `distributed`, in order."""
    if not distributed or len(shards) < 2:
        return [fn(*args) for args in shards]
    futures = run_shard.map(unmapped(fn), shards)
    return [future.result() for future in futures]
