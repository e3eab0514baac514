"""Index at scale: recall@16 against exact search and ms/mention of IVF-PQ, alone and with its shortlist
re-scored exactly from memory-mapped vectors, on real fused embeddings and on KBs generated on the fly
(never all in memory).

    # real: the fused entities of an `index` artifact, the val mentions of a `retrieve` artifact
    python -m bench.index_scale real --artifacts artifacts --retrieve KEY
    # gaussian: 10M unit vectors from a seeded mixture of Gaussians, 200 random queries (--kind ivfsq:
    # scalar-quantised residuals instead of PQ codes in the first pass; --kind auto: what the stage picks)
    python -m bench.index_scale synthetic --entities 10000000 --nlist 4096 --workdir /big/disk
    # real-like: the real fused entities grown to 10M, queried with the real val mentions
    python -m bench.index_scale synthetic --like real --artifacts artifacts --retrieve KEY --entities 10000000
    # growth: 10k entities appended to a 1M real-like index (as reindex-kb does) vs. a rebuild over all
    python -m bench.index_scale grow --artifacts artifacts --retrieve KEY --entities 1000000 --add 10000
    python -m bench.index_scale append-stage --artifacts artifacts --retrieve KEY --entities 1000000 --add 10000

Run on an idle machine. Peak memory is the process's maximum resident set size (build included). The
`synthetic` searches run in a fresh process from the saved index, after reading the vectors file once
so it is in the page cache (`--cold`: not), and report that process's own peak RSS and how much of the
file the page cache held (util-linux `fincore`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from kgmel_core import schemas
from kgmel_core.config import IndexConfig
from kgmel_core.retrieval.growth import coarse_distance
from kgmel_core.retrieval.index import (
    IndexPlan,
    append_vectors,
    build_index_from_shards,
    exact_top_k,
    ivf_centroids,
    load_index,
    plan_index,
    recall_at_k,
    save_index,
    search,
    set_nprobe,
    with_offsets,
)
from kgmel_core.retrieval.rescore import RescoredIndex, extend_vectors, write_rows
from storage import ArtifactStore

K = 16


def _status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1e6  # kB
    return float("nan")


def peak_rss_gb() -> float:
    """This process's own peak resident set (VmHWM); `ru_maxrss` would carry the build process's peak into
    the search process, which a spawned child inherits across fork and exec."""
    return _status_gb("VmHWM")


def current_rss_gb() -> float:
    return _status_gb("VmRSS")


def timed_search(index, queries: np.ndarray) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    _, ids = search(index, queries, K)
    return ids, 1000 * (time.perf_counter() - started) / len(queries)


def real_vectors(artifacts: str, retrieve_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(fused KB entities, fused val mentions, each mention's gold entity row, index key) of a retrieve
    artifact."""
    store = ArtifactStore(artifacts)
    retrieve = store.require("retrieve", retrieve_key)
    indexed = store.input(retrieve, "index")
    fused = indexed.read("fused_entities").with_row_index("row")
    mentions = (
        retrieve.read("fused_mentions")
        .filter(pl.col("split") == "val")
        .join(store.input(retrieve, "ingest").read("mentions").select("mention_id", "gold_qid"), on="mention_id")
        .join(fused.select("row", gold_qid="qid"), on="gold_qid", how="left", maintain_order="left")
    )
    gold = mentions["row"].fill_null(-1).to_numpy().astype(np.int64)
    return schemas.vector_matrix(fused["vector"]), schemas.vector_matrix(mentions["vector"]), gold, indexed.key


def gold_found(ids: np.ndarray, gold: np.ndarray) -> float:
    """Share of the mentions (with a gold entity in the KB) whose gold row is among the ids."""
    known = gold >= 0
    return float((ids[known] == gold[known, None]).any(1).mean())


def real(args: argparse.Namespace) -> None:
    entities, queries, _, key = real_vectors(args.artifacts, args.retrieve)
    n, d = entities.shape
    step = 1 << 15

    def shards():
        return (entities[i : i + step] for i in range(0, n, step))

    exact = exact_top_k(shards(), queries, K)
    print(f"{n} real fused entities (d={d}, index {key}), {len(queries)} val mentions, top-{K}\n")
    print("| index | nlist | nprobe | re-scored | bytes/vector in RAM | build s | ms / mention (batched) | recall@16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for nlist in args.nlist:
            config = IndexConfig(kind="ivfpq", nlist=nlist, nprobe=1, pq_m=d // 8, pq_nbits=args.pq_nbits,
                                 rescore=max(args.rescore))
            started = time.perf_counter()
            built = build_index_from_shards(shards, n, d, config, vectors_path=Path(work) / "v.npy")
            build = time.perf_counter() - started
            if built.plan.kind == "flat":
                print(f"| ivfpq nlist={nlist}: too few entities to train (< 39 per list), skipped |")
                continue
            for nprobe in args.nprobe:
                set_nprobe(built.index, nprobe)
                for shortlist in (0, *args.rescore):
                    searcher = RescoredIndex(built.index, Path(work) / "v.npy", shortlist) if shortlist else built.index
                    ids, ms = timed_search(searcher, queries)
                    print(f"| ivfpq | {nlist} | {nprobe} | {shortlist or '–'} | {d // 8 * args.pq_nbits // 8} | "
                          f"{build:.1f} | {ms:.3f} | "
                          f"{recall_at_k(ids, exact):.3f} |", flush=True)


def gaussian_kb(n: int, d: int, shard: int, clusters: int) -> tuple[Callable[[], Iterator[np.ndarray]], np.ndarray]:
    """Unit vectors from a seeded mixture of Gaussians (real KBs cluster; uniform noise is the worst case)."""
    centers = np.random.default_rng(0).standard_normal((clusters, d)).astype(np.float32)

    def make(seed: int, size: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = centers[rng.integers(0, len(centers), size)] + 0.6 * rng.standard_normal((size, d), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def shards():
        return (make(1 + i, min(shard, n - start)) for i, start in enumerate(range(0, n, shard)))

    return shards, make(10**6, 200)


def real_like_kb(seeds: np.ndarray, n: int, shard: int) -> Callable[[], Iterator[np.ndarray]]:
    """The real fused entities grown to `n` with their own structure: the seeds first, then children of
    random seeds, each the seed plus noise shaped by the seeds' covariance (so the KB keeps their
    spectrum) at a cosine to its seed of ~0.5–0.8 (the real nearest-neighbour cosine is ~0.55), and
    one child in five a near-duplicate (cosine ~0.95) of another child: same-name entities."""
    centred = seeds - seeds.mean(0)
    _, singular, basis = np.linalg.svd(centred, full_matrices=False)
    shape = (singular[:, None] * basis / np.sqrt((singular**2).sum())).astype(np.float32)  # E|g @ shape|^2 = 1

    def make(seed: int, size: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((size, len(singular)), dtype=np.float32) @ shape
        spread = rng.uniform(0.8, 1.6, (size, 1)).astype(np.float32)
        x = seeds[rng.integers(0, len(seeds), size)] + spread * noise
        twins = rng.random(size) < 0.2
        x[twins] = x[rng.integers(0, size, int(twins.sum()))] + 0.3 * noise[twins][::-1]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def shards():
        yield seeds[:n]
        for i, start in enumerate(range(len(seeds), n, shard)):
            yield make(1 + i, min(shard, n - start))

    return shards


def synthetic(args: argparse.Namespace) -> None:
    n, gold = args.entities, None
    if args.like == "real":
        seeds, queries, gold, key = real_vectors(args.artifacts, args.retrieve)
        queries, gold = queries[: args.queries], gold[: args.queries]
        d = seeds.shape[1]
        shards = real_like_kb(seeds, n, args.shard)
        what = f"real-like: the {len(seeds)} fused entities of index {key} grown to {n}, {len(queries)} val mentions"
    else:
        d = args.dim
        shards, queries = gaussian_kb(n, d, args.shard, args.clusters)
        queries = queries[: args.queries]
        what = f"gaussian: {n} entities, d={d}, {args.clusters} clusters, {len(queries)} queries"
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        vectors = Path(work) / "v.npy"
        auto = args.kind == "auto"  # derived nprobe and pq_m, and the kind chosen by measuring the built index
        config = IndexConfig(kind=args.kind, nlist=args.nlist, nprobe=0 if auto else args.nprobe[0],
                             pq_m=0 if auto else args.pq_m or d // 8, pq_nbits=args.pq_nbits, sq_bits=args.sq_bits,
                             rescore=max(args.rescore), rescore_dtype=args.dtype)
        started = time.perf_counter()
        built = build_index_from_shards(shards, n, d, config, vectors_path=vectors)
        build = time.perf_counter() - started
        started = time.perf_counter()
        exact = exact_top_k(shards(), queries, K)
        exact_s = time.perf_counter() - started
        plan = built.plan
        codes = {"ivfpq": f"IVF-PQ pq_m={plan.pq_m}x{args.pq_nbits} bits",
                 "ivfsq": f"IVF-SQ {args.sq_bits} bits a dim"}.get(plan.kind, plan.kind)
        if auto:
            codes = f"auto chose {codes}, nprobe {plan.nprobe} (held recall@16 of each plan tried: {built.measured})"
            nprobes = [plan.nprobe]
        else:
            nprobes = args.nprobe
        print(f"{what}; shards of {args.shard}; {codes} nlist={plan.nlist} "
              f"trained on {plan.train_size}, vectors {args.dtype} on disk; build {build:.0f} s "
              f"(vectors file included), exact top-{K} by streaming {exact_s:.0f} s")
        if gold is not None:
            print(f"gold entity in the exact top-{K}: {gold_found(exact, gold):.3f} of the val mentions")
        print()
        code_bytes = plan.pq_m * args.pq_nbits / 8 if plan.pq_m else d * args.sq_bits / 8
        index_gb = n * (code_bytes + 8) / 1e9  # codes + ids
        index_path, arrays = Path(work) / "index.faiss", Path(work) / "arrays.npz"
        save_index(built.index, index_path)
        np.savez(arrays, queries=queries, exact=exact, gold=gold if gold is not None else np.zeros(0, np.int64))
        del built
        print(f"index saved; build process peak RSS {peak_rss_gb():.2f} GB, {current_rss_gb():.2f} GB held while "
              f"the searches run in a fresh one{' (vectors file cold)' if args.cold else ''}\n")
        # A fresh process, as a server would be: the saved index loaded, the vectors file read through the page
        # cache (the build's leftovers would otherwise crowd the file out of it), its own peak RSS.
        child = multiprocessing.get_context("spawn").Process(
            target=search_sweep, args=(index_path, vectors, arrays, nprobes, args.rescore, index_gb, not args.cold))
        child.start()
        child.join()
        if child.exitcode:
            raise SystemExit(f"the search process failed (exit code {child.exitcode})")


def resident_gb(path: Path) -> str:
    """How much of the file is in the page cache (util-linux `fincore`), or "?" without it."""
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True,
                             check=True)
        return f"{int(out.stdout.split()[0]) / 1e9:.1f}"
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return "?"


def warm(path: Path) -> float:
    """Read the file once, front to back, so its pages are in the page cache (as in a server that has been
    answering for a while); seconds taken."""
    started = time.perf_counter()
    buffer = bytearray(1 << 26)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
    return time.perf_counter() - started


def search_sweep(index_path: Path, vectors: Path, arrays: Path, nprobes: list[int], rescores: list[int],
                 index_gb: float, warm_first: bool) -> None:
    """The nprobe x shortlist table, from the saved index and vectors file (run in a fresh process)."""
    saved = np.load(arrays)
    queries, exact, gold = saved["queries"], saved["exact"], saved["gold"]
    gold = gold if len(gold) else None
    index = load_index(index_path)
    if warm_first:
        print(f"vectors file read once in {warm(vectors):.0f} s before the searches", flush=True)
    print(f"vectors file in the page cache before the searches: {resident_gb(vectors)} of "
          f"{vectors.stat().st_size / 1e9:.1f} GB\n")
    print("| nprobe | re-scored | ms / mention (batched) | recall@16 vs. exact | gold in top-16 | index GB in RAM "
          "| vectors GB on disk | peak RSS GB (search process) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nprobe in nprobes:
        set_nprobe(index, nprobe)
        for shortlist in (0, *rescores):
            searcher = RescoredIndex(index, vectors, shortlist) if shortlist else index
            ids, ms = timed_search(searcher, queries)
            found = f"{gold_found(ids, gold):.3f}" if gold is not None else "–"
            print(f"| {nprobe} | {shortlist or '–'} | {ms:.3f} | {recall_at_k(ids, exact):.3f} | {found} | "
                  f"{index_gb:.2f} | {vectors.stat().st_size / 1e9:.2f} | {peak_rss_gb():.2f} |",
                  flush=True)
    print(f"\nvectors file in the page cache after the searches: {resident_gb(vectors)} GB")


def split_at(shards: Callable[[], Iterator[np.ndarray]], n: int) -> tuple[Callable[[], Iterator[np.ndarray]],
                                                                             np.ndarray]:
    """The first `n` rows (as shards) and the rest (in memory: the entities a KB gains)."""

    def head():
        seen = 0
        for shard in shards():
            if seen < n:
                yield shard[: n - seen]
            seen += len(shard)

    rest = [shard[max(0, n - seen) :] for seen, shard in with_offsets(shards()) if seen + len(shard) > n]
    return head, np.concatenate(rest)


def grow(args: argparse.Namespace) -> None:
    """What `reindex-kb` does to the index when a KB gains entities: read the index, append the new rows
    (their lists found by the trained quantizer), copy and extend the vectors file, write the index;
    against a rebuild over every row, on the same queries. Fusing the new entities with the retriever
    and the KB diff are not in the append time (they are the stage's, and scale with the rows added)."""
    seeds, mentions, _, key = real_vectors(args.artifacts, args.retrieve)
    n, d = args.entities, seeds.shape[1]
    everything = real_like_kb(seeds, n + args.add, args.shard)
    old, same = split_at(everything, n)
    rng = np.random.default_rng(7)  # entities of a new kind: isotropic noise, not shaped like the KB's spread
    shifted = seeds[rng.integers(0, len(seeds), args.add)] + 0.045 * rng.standard_normal((args.add, d), np.float32)
    shifted /= np.linalg.norm(shifted, axis=1, keepdims=True)
    config = IndexConfig(kind="ivfpq", pq_nbits=args.pq_nbits)
    print(f"real-like: the {len(seeds)} fused entities of index {key} grown to {n}, plus {args.add} new entities "
          f"drawn the same way ('same') or as isotropic noise around the seeds ('shifted', cosine ~0.6 to a "
          f"seed); {args.queries} val mentions, and {args.queries} queries near the new entities\n")
    print("| new entities | plan | append s | rebuild s | drift | recall@16 appended (mentions / near new) "
          "| recall@16 rebuilt (mentions / near new) | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        built = build_index_from_shards(old, n, d, config, vectors_path=work / "old.npy")
        save_index(built.index, work / "old.faiss")
        centroids, plan = ivf_centroids(built.index), built.plan
        baseline = coarse_distance(centroids, built.held)
        del built
        for name, added in (("same", same), ("shifted", shifted)):
            near = added[: args.queries] + 0.03 * rng.standard_normal((args.queries, d), np.float32)
            queries = {"mentions": mentions[: args.queries], "near": near / np.linalg.norm(near, axis=1, keepdims=True)}

            def rows(added=added):
                yield from old()
                yield added

            started = time.perf_counter()
            index = load_index(work / "old.faiss")
            with open(work / "grown.npy", "wb") as handle:
                extend_vectors(work / "old.npy", handle, n, d, len(added), config.rescore_dtype)
                append_vectors(index, added)
                write_rows(handle, added, config.rescore_dtype)
            save_index(index, work / "grown.faiss")
            appended = time.perf_counter() - started
            started = time.perf_counter()
            rebuilt = build_index_from_shards(rows, n + len(added), d, config, vectors_path=work / "rebuilt.npy")
            rebuild = time.perf_counter() - started
            recalls = {}
            for label, searcher in (("appended", RescoredIndex(index, work / "grown.npy", plan.rescore)),
                                    ("rebuilt", RescoredIndex(rebuilt.index, work / "rebuilt.npy", plan.rescore))):
                recalls[label] = [recall_at_k(search(searcher, q, K)[1], exact_top_k(rows(), q, K))
                                  for q in queries.values()]
            drift = coarse_distance(centroids, added) / baseline
            print(f"| {len(added)} {name} | nlist {plan.nlist}, nprobe {plan.nprobe}, top {plan.rescore} re-scored | "
                  f"{appended:.1f} | {rebuild:.0f} | {drift:.2f} | {recalls['appended'][0]:.3f} / "
                  f"{recalls['appended'][1]:.3f} | {recalls['rebuilt'][0]:.3f} / {recalls['rebuilt'][1]:.3f} | "
                  f"{peak_rss_gb():.2f} |", flush=True)
            del index, rebuilt


def write_index_artifact(writer, rows: Callable[[], Iterator[np.ndarray]], qids: list[str],
                         config: IndexConfig) -> IndexPlan:
    """What the index stage writes for a KB whose fused vectors are `rows()` (one part per shard): the
    fused_entities table, the FAISS index, the vectors file when the plan re-scores, and the stats
    `tasks.index._record` keeps (held recall included), so a bench's index reads like a built one."""
    from tasks.index import INDEX_FILE, VECTORS_FILE, _record

    n, d = len(qids), None
    for start, shard in with_offsets(rows()):
        d = shard.shape[1]
        table = pa.table({"qid": qids[start : start + len(shard)], "vector": schemas.vector_column(shard)})
        writer.write_table("fused_entities", table, schemas.fused_entities(d))
    plan = plan_index(n, d, config)
    vectors = writer.file_path(VECTORS_FILE) if plan.rescore else None
    built = build_index_from_shards(rows, n, d, config, vectors_path=vectors)
    save_index(built.index, writer.file_path(INDEX_FILE))
    _record(writer, config, built.index, plan, n, d, vectors, rows, built.held,
            {"mode": "build", "built_rows": n, "appended_since_build": 0})
    return plan


def append_stage(args: argparse.Namespace) -> None:
    """The index stage's append as `reindex-kb` runs it, at scale: `tasks.index._append` itself (copy the
    served fused_entities parts, fuse the new entities with the served retriever, add them to the FAISS
    index and the vectors file, measure the held recall) and the artifact's commit (hashing every file),
    on a previous index of `--entities` real-like rows in a scratch store. The new entities are `--add`
    real KB entities of the retrieve artifact's KB, fused from their stored frozen embeddings (the embed
    stage's work on new entities, the KB diff and the drift sample are not in this time)."""
    from types import SimpleNamespace

    from kgmel_core.retrieval.growth import KBChanges
    from tasks.index import ENCODE_BATCH, INDEX_FILE, _append
    from tasks.inputs import load_model

    served = ArtifactStore(args.artifacts)
    indexed = served.input(served.require("retrieve", args.retrieve), "index")
    train, ingest, embed = (served.input(indexed, name) for name in ("train", "ingest", "embed"))
    seeds, _, _, key = real_vectors(args.artifacts, args.retrieve)
    n = args.entities
    added = ingest.read("entities")["qid"].to_list()[: args.add]
    config = IndexConfig(kind="ivfpq", pq_nbits=args.pq_nbits)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        scratch = ArtifactStore(str(Path(work) / "store"))
        started = time.perf_counter()
        with scratch.writer("index", "previous", code="bench", config={}, inputs={}) as writer:
            # one part per batch, as `_fuse` writes them
            plan = write_index_artifact(writer, real_like_kb(seeds, n, ENCODE_BATCH), [f"S{i}" for i in range(n)],
                                        config)
        print(f"previous index: {n} real-like rows grown from the fused entities of index {key}, {plan.kind} "
              f"nlist {plan.nlist}, nprobe {plan.nprobe}, top {plan.rescore} re-scored; written in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        previous = scratch.require("index", "previous")
        model = load_model(train)
        started = time.perf_counter()
        index_now = load_index(previous.file(INDEX_FILE))
        with scratch.writer("index", "grown", code="bench", config={}, inputs={}) as writer:
            _append(SimpleNamespace(store=scratch), writer, config, model, train, ingest, embed, previous,
                    index_now, plan, KBChanges(added, 0, 0), {})
            appended = time.perf_counter() - started
        total = time.perf_counter() - started
        grown = scratch.require("index", "grown")
        print(f"append {len(added)} real entities to {n}: {appended:.1f} s in `_append`, {total:.1f} s with the "
              f"commit; {grown.manifest['stats']['entities']} rows, held recall@16 "
              f"{grown.manifest['stats'].get('recall_at_16_held')}; peak RSS {peak_rss_gb():.2f} GB")


def kb_diff(args: argparse.Namespace) -> None:
    """The index stage's KB diff at scale: which entities of a KB of `--entities` (each with `--triples`
    triples) are new after `--add` more arrive, as `growth.kb_changes` decides it."""
    from kgmel_core.retrieval.growth import entity_signatures, kb_changes

    def kb(n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
        qids = pl.Series([f"Q{i}" for i in range(n)])
        entities = pl.DataFrame({"qid": qids, "label": "entity " + qids, "description": "a thing called " + qids,
                                 "image_path": None, "image_sha256": None}, schema_overrides={
                                     "image_path": pl.String, "image_sha256": pl.String})
        heads = qids.to_frame("head_qid").join(pl.DataFrame({"k": list(range(args.triples))}), how="cross")
        triples = heads.select(
            "head_qid", relation=pl.format("relation {}", "k"), relation_description=pl.lit(None, pl.String),
            tail=pl.format("tail {} of {}", "k", "head_qid"), tail_description=pl.lit(""),
        )
        return entities, triples

    before, after = kb(args.entities), kb(args.entities + args.add)
    started = time.perf_counter()
    changes = kb_changes(entity_signatures(*before), entity_signatures(*after))
    print(f"KB diff of {args.entities} + {args.add} entities ({args.triples} triples each): "
          f"{time.perf_counter() - started:.1f} s, {len(changes.added)} added, {changes.changed} changed, "
          f"{changes.removed} removed; peak RSS {peak_rss_gb():.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("real")
    r.add_argument("--artifacts", default="artifacts")
    r.add_argument("--retrieve", required=True, help="key of a retrieve artifact (its index and val mentions)")
    r.add_argument("--nlist", type=int, nargs="+", default=[64, 256])
    r.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 32])
    r.add_argument("--rescore", type=int, nargs="+", default=[64, 256])
    r.add_argument("--pq-nbits", type=int, choices=[4, 8], default=4, help="4: fast-scan PQ")
    r.add_argument("--workdir", default=None, help="where the vectors file goes (default: the temp dir)")
    s = sub.add_parser("synthetic")
    s.add_argument("--like", choices=["gaussian", "real"], default="gaussian")
    s.add_argument("--artifacts", default="artifacts", help="--like real: the store holding --retrieve")
    s.add_argument("--retrieve", help="--like real: key of a retrieve artifact (seed entities, val mentions)")
    s.add_argument("--entities", type=int, default=10_000_000)
    s.add_argument("--dim", type=int, default=768, help="gaussian only (real-like: the seeds' width)")
    s.add_argument("--clusters", type=int, default=2000)
    s.add_argument("--shard", type=int, default=200_000)
    s.add_argument("--nlist", type=int, default=4096)
    s.add_argument("--pq-m", type=int, default=0)
    s.add_argument("--pq-nbits", type=int, choices=[4, 8], default=4, help="4: fast-scan PQ")
    s.add_argument("--kind", choices=["ivfpq", "ivfsq", "auto"], default="ivfpq",
                   help="the first pass's codes: product-quantised, or scalar-quantised residuals; auto: the "
                        "index stage's default, which measures the built IVF-PQ and may re-file it as IVF-SQ "
                        "(--nprobe and --pq-m are then derived)")
    s.add_argument("--sq-bits", type=int, choices=[4, 6, 8], default=4, help="--kind ivfsq: bits a dimension")
    s.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    s.add_argument("--rescore", type=int, nargs="+", default=[256, 1024])
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    s.add_argument("--queries", type=int, default=500)
    s.add_argument("--workdir", default=None, help="where the vectors file goes (10M x 768 fp16: 15 GB)")
    s.add_argument("--cold", action="store_true", help="search without reading the vectors file into the page "
                   "cache first (what is left there after the build)")
    g = sub.add_parser("grow")
    g.add_argument("--artifacts", default="artifacts")
    g.add_argument("--retrieve", required=True, help="key of a retrieve artifact (seed entities, val mentions)")
    g.add_argument("--entities", type=int, default=1_000_000)
    g.add_argument("--add", type=int, default=10_000)
    g.add_argument("--shard", type=int, default=200_000)
    g.add_argument("--pq-nbits", type=int, choices=[4, 8], default=4)
    g.add_argument("--queries", type=int, default=300)
    g.add_argument("--workdir", default=None)
    a = sub.add_parser("append-stage")
    a.add_argument("--artifacts", default="artifacts")
    a.add_argument("--retrieve", required=True, help="key of a retrieve artifact (seeds, the KB's new entities)")
    a.add_argument("--entities", type=int, default=1_000_000)
    a.add_argument("--add", type=int, default=10_000)
    a.add_argument("--pq-nbits", type=int, choices=[4, 8], default=4)
    a.add_argument("--workdir", default=None)
    k = sub.add_parser("kb-diff")
    k.add_argument("--entities", type=int, default=1_000_000)
    k.add_argument("--add", type=int, default=10_000)
    k.add_argument("--triples", type=int, default=10)
    args = parser.parse_args()
    if args.what == "synthetic" and args.like == "real" and not args.retrieve:
        parser.error("--like real needs --retrieve KEY (the real fused entities to grow from)")
    {"real": real, "synthetic": synthetic, "grow": grow, "append-stage": append_stage,
     "kb-diff": kb_diff}[args.what](args)


if __name__ == "__main__":
    main()
