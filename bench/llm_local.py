"""Cost of the LLM stages on the packaged local model (Qwen2.5-Coder-1.5B-Instruct, llama.cpp on 127.0.0.1).

Generation: the first `--mentions` mentions (by id) of a split of a finished `ingest` artifact, asked in
each `--formats` (`compact`: what stage 1 sends, held to its grammar; `legacy`: the sectioned
`Type:/Description:/- "mention" | relation | object` prompt stage 1 sent until 2026-12, kept here as the
baseline), at each number of server slots, with the answer cache off. `--busy N` keeps N other
CPU-bound processes running through the measurement (what a shared machine looks like); the server's
threads are then what stage 1 would pick (`llm.threads`, else the idle cores) unless `--threads` says.

Rerank (`--rerank KEY`): rebuilds the very prompts a finished `rerank` artifact sent (its own settings)
and asks them again.

Reports prompt and generated tokens per call (the server's `usage`), s/call, calls/s, and for
generation the share of answers that parse to at least one triple and the triples per answer.

    python -m bench.llm_local --artifacts A --ingest KEY [--mentions 16] [--formats legacy compact] \\
        [--slots 1 2] [--busy 0 1] [--threads N] [--rerank KEY]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import polars as pl

from kgmel_core.config import GenerationConfig, LLMConfig, RerankConfig
from kgmel_core.llm.client import LLMClient, LLMRequest, LLMResult
from kgmel_core.llm.local import LOCAL_MODEL_NAME, free_cores, local_llm_server
from kgmel_core.llm.parsing import parse_generation
from kgmel_core.llm.prompts import (
    ENTITY_TYPES,
    PREFERRED_RELATIONS,
    generation_grammar,
    generation_messages,
    rerank_requests,
)
from kgmel_core.rerank.candidates import candidate_lists, relation_tail_pairs
from storage import ArtifactStore

# Stage 1's prompt until 2026-12 (94 generated tokens a call), the baseline the compact format is measured against.
LEGACY_SYSTEM = (
    "You describe an entity mention for a knowledge graph. Given a sentence (and an image, if any) and a "
    "mention in it, answer in exactly this format:\n"
    "Type: <one of: " + ", ".join(ENTITY_TYPES) + ">\n"
    "Description: <one short line saying who or what the mention is>\n"
    "Triples:\n"
    '- "<mention>" | <relation> | <object>\n'
    "Prefer these relations: " + ", ".join(PREFERRED_RELATIONS) + ". "
    "Write only facts the sentence supports or that are well known about this entity."
)
LEGACY_MAX_TOKENS = 96


def legacy_messages(sentence: str, mention: str, max_triples: int) -> list[dict]:
    user = f"Sentence: {sentence}\nMention: {mention}\nWrite at most {max_triples} triples."
    return [{"role": "system", "content": LEGACY_SYSTEM}, {"role": "user", "content": user}]


def generation_case(fmt: str, mentions: list[dict], generation: GenerationConfig):
    """(requests, max_tokens, grammar) of one answer format."""
    if fmt == "legacy":
        messages = [legacy_messages(m["sentence"], m["mention"], generation.max_triples) for m in mentions]
        return messages, LEGACY_MAX_TOKENS, None
    messages = [generation_messages(m["sentence"], m["mention"], None, False) for m in mentions]
    return messages, generation.llm.max_tokens, generation_grammar(generation.max_triples)


def rerank_prompts(store: ArtifactStore, key: str, n: int) -> tuple[list[LLMRequest], RerankConfig]:
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
    return [LLMRequest(mid, messages) for mid, messages in pairs], config


def ask(api_base: str, requests: list[LLMRequest], max_tokens: int, slots: int, grammar: str | None):
    config = LLMConfig(model="local", max_tokens=max_tokens, concurrency=slots, timeout_s=900, retries=0)
    client = LLMClient(
        config, "bench", None, api_base=api_base, model=f"openai/{LOCAL_MODEL_NAME}",
        extra_body={"cache_prompt": True}, grammar=grammar,
    )
    start = time.perf_counter()
    results = client.run(requests, progress=False)
    wall = time.perf_counter() - start
    if not any(r.ok for r in results):
        raise RuntimeError(f"every call failed: {results[0].call.get('error')}")
    return results, wall


def summary(results: list[LLMResult], wall: float) -> dict:
    ok = [r.call for r in results if r.ok]
    return {
        "tokens_in": statistics.mean(c["tokens_in"] for c in ok),
        "tokens_out": statistics.mean(c["tokens_out"] for c in ok),
        "s_per_call": statistics.median(c["latency_s"] for c in ok),
        "calls_per_s": len(ok) / wall,
    }


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """`n` other CPU-bound processes for the duration of the block."""
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for process in spinners:
        process.start()
    try:
        time.sleep(1.0 if n else 0.0)  # let them show in the CPU load the server's thread choice samples
        yield
    finally:
        for process in spinners:
            process.terminate()
            process.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--ingest", help="key of a finished ingest artifact whose mentions generation is asked about")
    parser.add_argument("--split", default="val")
    parser.add_argument("--rerank", help="key of a finished rerank artifact whose prompts to replay")
    parser.add_argument("--mentions", type=int, default=16)
    parser.add_argument("--formats", nargs="+", default=["legacy", "compact"], choices=["legacy", "compact"])
    parser.add_argument("--slots", type=int, nargs="+", default=[1], help="llama.cpp server slots (= calls at once)")
    parser.add_argument("--busy", type=int, nargs="+", default=[0], help="other CPU-bound processes running")
    parser.add_argument("--threads", type=int, help="server threads (default: stage 1's own choice)")
    args = parser.parse_args()
    if not args.ingest and not args.rerank:
        parser.error("give --ingest KEY (generation) and/or --rerank KEY")
    store = ArtifactStore(args.artifacts)
    generation = GenerationConfig()
    cases = []  # (stage, format, requests, max_tokens, grammar, mentions)
    if args.ingest:
        mentions = (
            store.require("ingest", args.ingest).read("mentions").filter(pl.col("split") == args.split)
            .sort("mention_id").head(args.mentions).to_dicts()
        )
        for fmt in args.formats:
            messages, max_tokens, grammar = generation_case(fmt, mentions, generation)
            requests = [LLMRequest(m["mention_id"], msgs) for m, msgs in zip(mentions, messages, strict=True)]
            cases.append(("generate", fmt, requests, max_tokens, grammar, mentions))
    if args.rerank:
        requests, rerank_config = rerank_prompts(store, args.rerank, args.mentions)
        cases.append(("rerank", rerank_config.layout, requests, rerank_config.llm.max_tokens, None, None))
    print(f"{args.mentions} {args.split} mentions; generation max_triples={generation.max_triples}")
    print("| stage | format | slots | busy processes | threads | prompt tokens / call | generated tokens / call "
          "| s / call (median) | calls/s | parsed | triples / answer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for busy in args.busy:
        with busy_processes(busy):
            for slots in args.slots:
                threads = args.threads or free_cores()
                with local_llm_server(parallel=slots, threads=threads) as api_base:
                    for stage, fmt, requests, max_tokens, grammar, mentions in cases:
                        results, wall = ask(api_base, requests, max_tokens, slots, grammar)
                        m = summary(results, wall)
                        parsed = "–"
                        per_answer = "–"
                        if mentions is not None:
                            answers = [
                                parse_generation(r.text, mention["mention"], generation.max_triples, r.truncated)
                                for r, mention in zip(results, mentions, strict=True) if r.ok
                            ]
                            parsed = f"{sum(a.ok for a in answers) / len(results):.2f}"
                            per_answer = f"{statistics.mean(len(a.triples) for a in answers):.1f}"
                        print(f"| {stage} | {fmt} | {slots} | {busy} | {threads} | {m['tokens_in']:.0f} | "
                              f"{m['tokens_out']:.1f} | {m['s_per_call']:.2f} | {m['calls_per_s']:.3f} | {parsed} | "
                              f"{per_answer} |", flush=True)


if __name__ == "__main__":
    main()
