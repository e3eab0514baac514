"""Cost of the LLM stages on the packaged local model (Qwen2.5-Coder-1.5B-Instruct, llama.cpp on 127.0.0.1).

For mentions a finished `rerank` artifact sent to the LLM, rebuilds the very prompts the stages send
(rerank: the artifact's own settings; generation: the default `generation` settings) and asks the
model again with the answer cache off, at each concurrency level (server slots = concurrency). Reports
prompt tokens/mention, s/mention, prompt and generated tokens/s, and calls/s. Token counts are the
server's own (`usage`).

    python -m bench.llm_local --artifacts /path/to/artifacts --rerank KEY [--mentions 8] [--concurrency 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import polars as pl

from kgmel_core.config import GenerationConfig, LLMConfig, RerankConfig
from kgmel_core.llm.client import LLMClient, LLMRequest
from kgmel_core.llm.local import LOCAL_MODEL_NAME, local_llm_server
from kgmel_core.llm.prompts import generation_messages, rerank_requests
from kgmel_core.rerank.candidates import candidate_lists, relation_tail_pairs
from storage import ArtifactStore


def rerank_prompts(store: ArtifactStore, key: str, n: int) -> tuple[list[LLMRequest], list[dict], RerankConfig]:
    """The first `n` rerank prompts (by mention id) of the mentions artifact `key` sent to the LLM."""
    reranked = store.require("rerank", key)
    config = RerankConfig(**{k: v for k, v in reranked.manifest["config"].items() if k != "llm"})
    ingest, retrieve, filtered = (store.input(reranked, s) for s in ("ingest", "retrieve", "filter"))
    sent = (
        reranked.read("predictions").filter(pl.col("call_id").is_not_null())
        .sort("mention_id").head(n)["mention_id"].to_list()
    )
    mentions = ingest.read("mentions").filter(pl.col("mention_id").is_in(sent)).sort("mention_id").to_dicts()
    entities = {r["qid"]: r for r in ingest.read("entities").iter_rows(named=True)}
    facts = relation_tail_pairs(filtered.read("filtered_triples"), "mention_id", "qid")
    pairs, _ = rerank_requests(
        mentions, candidate_lists(retrieve.read("candidates"), config.candidates), entities, facts, {}, {},
        config.max_description_chars, config.layout,
    )
    return [LLMRequest(mid, messages) for mid, messages in pairs], mentions, config


def measure(api_base: str, requests: list[LLMRequest], max_tokens: int, concurrency: int) -> dict:
    config = LLMConfig(model="local", max_tokens=max_tokens, concurrency=concurrency, timeout_s=900, retries=0)
    client = LLMClient(
        config, "bench", None, api_base=api_base, model=f"openai/{LOCAL_MODEL_NAME}", extra_body={"cache_prompt": True}
    )
    start = time.perf_counter()
    results = client.run(requests, progress=False)
    wall = time.perf_counter() - start
    ok = [r.call for r in results if r.ok]
    if not ok:
        raise RuntimeError(f"every call failed: {results[0].call.get('error')}")
    return {
        "calls": len(ok),
        "tokens_in": statistics.mean(c["tokens_in"] for c in ok),
        "tokens_out": statistics.mean(c["tokens_out"] for c in ok),
        "s_per_call": statistics.median(c["latency_s"] for c in ok),
        "calls_per_s": len(ok) / wall,
        "in_per_s": sum(c["tokens_in"] for c in ok) / wall,
        "out_per_s": sum(c["tokens_out"] for c in ok) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--rerank", required=True, help="key of a finished rerank artifact whose prompts to replay")
    parser.add_argument("--mentions", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    store = ArtifactStore(args.artifacts)
    rerank_requests_, mentions, rerank_config = rerank_prompts(store, args.rerank, args.mentions)
    generation = GenerationConfig()
    generation_requests = [
        LLMRequest(
            m["mention_id"], generation_messages(m["sentence"], m["mention"], None, generation.max_triples, False)
        )
        for m in mentions
    ]
    print(f"{len(mentions)} mentions; rerank K={rerank_config.candidates}, layout {rerank_config.layout}; "
          f"generation max_tokens={generation.llm.max_tokens}")
    print("| stage | concurrency | prompt tokens / mention | generated tokens / mention | s / call (median) "
          "| calls/s | prompt tokens/s | generated tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in args.concurrency:
        with local_llm_server(parallel=concurrency) as api_base:
            for stage, requests, max_tokens in (
                ("rerank", rerank_requests_, rerank_config.llm.max_tokens),
                ("generate", generation_requests, generation.llm.max_tokens),
            ):
                m = measure(api_base, requests, max_tokens, concurrency)
                print(f"| {stage} | {concurrency} | {m['tokens_in']:.0f} | {m['tokens_out']:.1f} | "
                      f"{m['s_per_call']:.1f} | {m['calls_per_s']:.3f} | {m['in_per_s']:.1f} | {m['out_per_s']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
