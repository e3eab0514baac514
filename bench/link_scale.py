"""`kgmel link` end to end against a 1M-entity index: mentions/s and peak RSS, without the LLM.

A scratch store (hard links to a real store's files, so the real one is never touched) gets an `index`
artifact of the served WikiMEL retriever grown to `--entities`: the real fused KB entities first, then
real-like rows (`bench.index_scale.real_like_kb`) under made-up qids, indexed as the index stage indexes
a KB of that size (`index.kind: auto`: IVF-PQ with its shortlist re-scored from the memory-mapped
vectors). It is registered as model `<model>-<entities>` and `kgmel link` runs as a user runs it, in a
child process: ingest the mentions file, embed the mentions, search, re-score, write the candidates.

    python -m bench.link_scale --artifacts artifacts --model wikimel --dataset ../shared/data/wikimel \\
        --config configs/wikimel.yaml --entities 1000000 --mentions 10000 [--cold] [--repeats 5]

`--cold` leaves the store's embedding cache out of the scratch copy, so every mention string is
encoded (new mentions); without it, strings the store has embedded before are served from the cache.
`--cold-disk` also drops the prepared store's files from the page cache before each run
(`POSIX_FADV_DONTNEED`), as after a reboot: the index and its vectors file are then read from the disk.
`--repeats N` links N times, each on a fresh copy of the prepared store, and reports the median (two
shared cores are noisy: single runs of the same code spread by several seconds).
The mentions are the first `--mentions` of the train split (never test). Run on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from bench.index_scale import real_like_kb, write_index_artifact
from kgmel_core import schemas
from kgmel_core.config import IndexConfig
from storage import ArtifactStore, InputRef

SHARD = 1 << 16


# Files a run edits in place (DuckDB's catalog, diskcache's SQLite): copied, or a hard link would edit the source.
EDITED_IN_PLACE = ("kgmel.duckdb", "kgmel.duckdb.wal", "_llm_cache")


def scratch_store(source: Path, target: Path, cold: bool) -> None:
    """A copy of the store made of hard links (artifacts and the registry's events are never edited: new
    ones are new files), except what a run edits in place."""
    skip = {"_embedding_cache"} if cold else set()

    def link_or_copy(src: str, dst: str) -> None:
        if Path(src).relative_to(source).parts[0] in EDITED_IN_PLACE:
            shutil.copy2(src, dst)
        else:
            os.link(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy, ignore=lambda folder, names: [
        n for n in names if Path(folder) == source and n in skip])


def evict_from_page_cache(folder: Path) -> None:
    """Ask the kernel to drop every file under `folder` from the page cache (clean pages only: the
    prepared store was written long before, so they are clean)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def grown_index(store: ArtifactStore, model: str, n: int) -> None:
    """Write an index artifact of the served retriever over `n` entities; register it as a model."""
    version = store.models.require(model).serving
    served = store.require("index", version.index)
    fused = served.read("fused_entities")
    seeds = schemas.vector_matrix(fused["vector"])
    qids = fused["qid"].to_list() + [f"Q-bench-{i}" for i in range(n - len(seeds))]
    rows = real_like_kb(seeds, n, SHARD)
    key = hashlib.sha256(f"bench.link_scale {n} {served.key}".encode()).hexdigest()[:20]
    inputs = {name: InputRef.of(store.input(served, name)) for name in ("train", "ingest", "embed")}
    with store.writer("index", key, code="bench.link_scale", config={"bench": n}, inputs=inputs) as writer:
        plan = write_index_artifact(writer, rows, qids, IndexConfig())
    name = f"{model}-{n}"
    store.models.register(name, version.train, key, {"bench": "link_scale"})
    print(f"index {key}: {n} entities ({len(seeds)} real), {plan.kind} nlist={plan.nlist} nprobe={plan.nprobe} "
          f"top {plan.rescore} re-scored; model {name!r}", flush=True)


def mentions_file(dataset: Path, count: int, target: Path) -> int:
    """The first train records holding `count` mentions, as a MIMIC JSON file; how many mentions."""
    train = set(json.loads((dataset / "splits.json").read_text())["train"])
    records, mentions = [], 0
    for record in json.loads((dataset / "WikiMEL.json").read_text()):
        if record["id"] in train and mentions < count:
            records.append(record)
            mentions += len(record["mention"])
    target.write_text(json.dumps(records))
    return mentions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--model", default="wikimel")
    parser.add_argument("--dataset", default="../shared/data/wikimel")
    parser.add_argument("--config", default="configs/wikimel.yaml")
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--mentions", type=int, default=10_000)
    parser.add_argument("--cold", action="store_true", help="no embedding cache: every mention string encoded")
    parser.add_argument("--cold-disk", action="store_true", help="drop the prepared store's files from the page "
                        "cache before each run, as after a reboot")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed to `kgmel link --set` (repeatable), e.g. encoder.batch_size=32")
    parser.add_argument("--keep", default=None, help="a folder for the prepared store (the grown index), kept and "
                        "reused by later runs with the same --entities and --cold")
    parser.add_argument("--repeats", type=int, default=1, help="link runs, each on a fresh copy of the prepared "
                        "store (so each is as cold as the first); the median is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) if not args.keep else contextlib.nullcontext(args.keep) as work:
        work = Path(work)
        model = f"{args.model}-{args.entities}"
        prepared = work / "store"
        if not prepared.exists():
            scratch_store(Path(args.artifacts).resolve(), prepared, args.cold)
            started = time.perf_counter()
            grown_index(ArtifactStore(prepared), args.model, args.entities)
            print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
        count = mentions_file(Path(args.dataset), args.mentions, work / "mentions.json")
        walls = [link_once(work, prepared, model, args, count, repeat) for repeat in range(args.repeats)]
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
        median = statistics.median(walls)
        caches = ("cold: no embedding cache" if args.cold else "warm embedding cache") + (
            ", store outside the page cache" if args.cold_disk else "")
        print(f"\n{count} mentions ({caches}) against "
              f"{args.entities} entities, median of {len(walls)}: {median:.1f} s wall for `kgmel link` (process "
              f"start included), {count / median:.0f} mentions/s, peak RSS {peak:.2f} GB; --set {args.overrides}")


def link_once(work: Path, prepared: Path, model: str, args: argparse.Namespace, count: int, repeat: int) -> float:
    """One `kgmel link` in a child process on a fresh copy of the prepared store; its wall seconds."""
    store = work / f"run-{repeat}"
    shutil.rmtree(store, ignore_errors=True)
    scratch_store(prepared, store, args.cold)
    if args.cold_disk:
        evict_from_page_cache(store)
    kgmel = str(Path(sys.executable).parent / "kgmel")
    command = [kgmel, "link", str(work / "mentions.json"), "--config", args.config, "--model", model,
               "--set", f"artifacts={store}", "--set", "rerank.enabled=false",
               "--set", "nil.enabled=false", "--set", "generation.enabled=false"]
    command += [part for override in args.overrides for part in ("--set", override)]
    try:
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"kgmel link failed ({done.returncode}):\n{done.stderr[-4000:]}")
        runs = pl.read_parquet(store / "_runs" / "*.parquet")
        last = runs.filter(pl.col("run_id") == runs.sort("finished_at")["run_id"][-1]).sort("finished_at")
        stages = ", ".join(f"{row['stage']} {row['seconds']:.1f} s{' (cached)' if row['cache_hit'] else ''}"
                           for row in last.iter_rows(named=True))
        print(f"run {repeat + 1}: {seconds:.1f} s wall, {count / seconds:.0f} mentions/s ({stages})", flush=True)
        return seconds
    finally:
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
