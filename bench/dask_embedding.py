"""Embedding throughput with 1 vs 2 Dask workers (the `embed` stage's shards on Prefect's DaskTaskRunner).

    python -m bench.dask_embedding [--strings 8192]

On a 2-core machine two workers cannot beat one worker that already uses both cores (torch is
multi-threaded): the ratio says what distribution costs here; it pays on more machines.
"""

from __future__ import annotations

import argparse
import time

from prefect import flow
from prefect_dask import DaskTaskRunner

from kgmel_core.factory import EncoderSpec, encode_texts_with
from tasks.parallel import map_shards

SPEC = EncoderSpec("minilm", "none", "ViT-B-32", None, 256, "cpu", "fp32")


def synthetic_texts(n: int) -> list[str]:
    return [f"Entity {i}: a synthetic description of thing number {i} for the throughput benchmark" for i in range(n)]


@flow(name="bench-dask-embedding")
def encode_all(n_strings: int, shards: int) -> float:
    texts = synthetic_texts(n_strings)  # made here: a flow's parameters must stay small
    map_shards(True, encode_texts_with, [(SPEC, texts[:256])] * shards)  # load the model on every worker
    started = time.perf_counter()
    size = -(-len(texts) // shards)
    map_shards(True, encode_texts_with, [(SPEC, texts[i : i + size]) for i in range(0, len(texts), size)])
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strings", type=int, default=8192)
    args = parser.parse_args()
    print("| Dask workers x threads | strings/s |")
    print("|---|---:|")
    rates = {}
    for workers, threads in ((1, 2), (2, 1)):
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": threads,
                                                "processes": True, "dashboard_address": None})
        rates[workers] = encode_all.with_options(task_runner=runner)(args.strings, shards=max(2, workers * 2))
        print(f"| {workers} x {threads} | {rates[workers]:.0f} |", flush=True)
    print(f"\nratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
