"""LLM stages against the packaged local model server (llama.cpp, 127.0.0.1).

1. Rerank prompt tokens per mention with and without triple filtering, for the mentions of the
   latest `filter` artifact of an artifact store (run `make demo` first). Tokens are counted by
   the model server itself (a 1-token completion's `prompt_tokens`).
2. Calls/s for short generation calls at concurrency 1, 4 and 8 (cache off).

    python -m bench.llm_local [--artifacts artifacts] [--calls 16]
"""

from __future__ import annotations

import argparse
import time

import polars as pl

from kgmel_core.config import LLMConfig
from kgmel_core.llm.client import LLMClient, LLMRequest
from kgmel_core.llm.local import LOCAL_MODEL_NAME, local_llm_server
from kgmel_core.llm.prompts import GENERATION_STOP, generation_messages, rerank_requests
from storage import ArtifactStore
from tasks.rerank import candidate_lists, relation_tail_pairs

UNFILTERED_CAP = 50  # the reference's cap on triples per entity in the rerank prompt


def _client(api_base: str, concurrency: int, max_tokens: int) -> LLMClient:
    config = LLMConfig(model="local", max_tokens=max_tokens, concurrency=concurrency, timeout_s=600, retries=0)
    return LLMClient(
        config,
        "bench",
        None,
        api_base=api_base,
        model=f"text-completion-openai/{LOCAL_MODEL_NAME}",
        text_mode=True,
        stop=GENERATION_STOP,
    )


def rerank_token_counts(store: ArtifactStore, api_base: str, filter_key: str | None) -> None:
    keys = [filter_key] if filter_key else store.keys("filter")
    if len(keys) != 1:
        print(f"{len(keys)} filter artifacts under {store.root} ({keys}): run `make demo` first, or pick one "
              "with --filter KEY; skipping the token benchmark")
        return
    filtered = store.require("filter", keys[0])
    ingest, generation = store.input(filtered, "ingest"), store.input(filtered, "generation")
    retrieve = store.input(filtered, "retrieve")
    k = filtered.manifest["config"]["candidates"]
    asked = filtered.read("filter_counts")["mention_id"].to_list()
    mentions = ingest.read("mentions").filter(pl.col("mention_id").is_in(asked)).to_dicts()
    candidates = candidate_lists(retrieve, k)
    entities = {r["qid"]: r for r in ingest.read("entities").iter_rows(named=True)}
    generated = relation_tail_pairs(generation.read("mention_triples"), "mention_id")
    with_filter = relation_tail_pairs(filtered.read("filtered_triples"), "mention_id", "qid")
    capped = ingest.read("kb_triples").filter(pl.int_range(pl.len()).over("head_qid") < UNFILTERED_CAP)
    per_entity = relation_tail_pairs(capped, "head_qid")
    without = {(m, q): per_entity.get(q, []) for m in asked for q in candidates.get(m, [])}
    client = _client(api_base, 2, 1)
    print(f"rerank prompts for {len(mentions)} mentions, {k} candidates each, KB cap {UNFILTERED_CAP} triples/entity")
    print("| prompt | tokens / mention (mean) | min | max |")
    print("|---|---:|---:|---:|")
    for name, facts in (("with filtering", with_filter), ("without filtering", without)):
        pairs, _ = rerank_requests(mentions, candidates, entities, facts, generated, instruction=False)
        results = client.run([LLMRequest(m, msgs) for m, msgs in pairs], progress=False)
        tokens = [r.call["tokens_in"] for r in results if r.ok]
        print(f"| {name} | {sum(tokens) / len(tokens):.0f} | {min(tokens)} | {max(tokens)} |")


def throughput(api_base: str, calls: int) -> None:
    print(f"\n{calls} generation calls (max 48 new tokens, text-only) per concurrency level")
    print("| concurrency | calls/s | mean latency s | tokens out/s |")
    print("|---:|---:|---:|---:|")
    for concurrency in (1, 4, 8):
        client = _client(api_base, concurrency, 48)
        requests = [
            LLMRequest(
                str(i),
                generation_messages(
                    f"Station {concurrency}-{i} opened in the city of Verna{i}.",
                    f"Verna{i}",
                    None,
                    4,
                    False,
                    instruction=False,
                ),
            )
            for i in range(calls)
        ]
        start = time.perf_counter()
        results = client.run(requests, progress=False)
        wall = time.perf_counter() - start
        ok = [r for r in results if r.ok]
        latency = sum(r.call["latency_s"] for r in ok) / max(len(ok), 1)
        out_tokens = sum(r.call["tokens_out"] for r in ok)
        print(f"| {concurrency} | {len(ok) / wall:.2f} | {latency:.2f} | {out_tokens / wall:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--filter", help="key of the filter artifact to measure (default: the only one)")
    args = parser.parse_args()
    with local_llm_server(parallel=8) as api_base:
        rerank_token_counts(ArtifactStore(args.artifacts), api_base, args.filter)
        throughput(api_base, args.calls)


if __name__ == "__main__":
    main()
