"""The LLM method read two ways on the same val mentions: its hard choice, and the probability it gives
each candidate's number (the top log-probabilities of its one-token answer) fused with the retriever's
score – the reading the issue asks to measure beside the choice.

The prompt is the `numbered` layout (sentence and mention first, candidates 1..K in retrieval order, no
KB facts, descriptions cut at `rerank.max_description_chars`), so the first answer token is a number and
its alternatives grade every candidate (`number_logprobs`). The fusion is the learned reranker's
conditional logit (`kgmel_core.rerank.fusion`) over (LLM log-probability, retrieval score), each mention
ranked with the weights fitted on the other fold of the sample, so no gain is fitted on the mention it
is measured on. A mention whose answer names no number falls back to the retriever (counted).

The sample is the LLM table's (docs/results.md): `in_scope(mentions, {splits: [val], max_mentions: 200,
sample_seed: 0})` of the retrieve artifact's ingest. Answers are cached in the store's `_llm_cache`.

    python -m bench.llm_probabilities --artifacts ROOT --retrieve RETRIEVE_KEY [--mentions 200] [--candidates 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kgmel_core.config import LLMConfig, LLMScope, RerankConfig
from kgmel_core.data.scope import in_scope
from kgmel_core.llm.client import LLMRequest
from kgmel_core.llm.open import open_llm
from kgmel_core.llm.parsing import parse_rerank_answer
from kgmel_core.llm.prompts import rerank_requests
from kgmel_core.metrics import paired_gain
from kgmel_core.rerank.candidates import candidate_lists
from kgmel_core.rerank.fusion import fit_fusion, out_of_fold
from kgmel_core.rerank.llm_choice import number_logprobs
from storage import ArtifactStore


def readings(qids: list[str], labels: list[str], text: str | None,
             logprobs: np.ndarray | None) -> tuple[int, int, bool, bool]:
    """(hard choice, probability argmax) as candidate indexes, and whether each was readable; an
    unreadable one is retrieval's top-1 (index 0)."""
    chosen, _ = parse_rerank_answer(text or "", list(zip(qids, labels, strict=True)))
    hard = qids.index(chosen) if chosen else 0
    graded = int(np.argmax(logprobs)) if logprobs is not None else 0
    return hard, graded, chosen is not None, logprobs is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--retrieve", required=True, help="key of a retrieve artifact (its val candidate lists)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--mentions", type=int, default=200)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=8, help="K, at most 9 (one-token numbers)")
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the free cores)")
    args = parser.parse_args()

    store = ArtifactStore(args.artifacts)
    retrieve = store.get("retrieve", args.retrieve)
    if retrieve is None:
        raise SystemExit(f"no finished retrieve artifact {args.retrieve} in {args.artifacts}")
    ingest = store.input(retrieve, "ingest")
    scope = LLMScope(splits=[args.split], max_mentions=args.mentions, sample_seed=args.sample_seed)
    mentions = in_scope(ingest.read("mentions"), scope)
    served = retrieve.read("candidates")
    lists = candidate_lists(served, args.candidates)
    score_of = {(m, q): s for m, q, s in served.select("mention_id", "qid", "score").iter_rows()}
    entities = {r["qid"]: r for r in ingest.read("entities").iter_rows(named=True)}
    rows = mentions.to_dicts()
    requests, options = rerank_requests(rows, lists, entities, {}, {}, {},
                                        RerankConfig().max_description_chars, "numbered")

    config = LLMConfig(model="local", max_tokens=1, temperature=0.0, timeout_s=900, retries=0, concurrency=1,
                       threads=args.threads)
    started = time.perf_counter()
    with open_llm(config, "rerank", store.root / "_llm_cache", top_logprobs=args.top_logprobs) as (client, _):
        results = client.run([LLMRequest(mid, messages) for mid, messages in requests])
    seconds = time.perf_counter() - started

    gold = {r["mention_id"]: r["gold_qid"] for r in rows}
    ids, retrieval, graded, golds, hard, argmax, unreadable = [], [], [], [], [], [], {"choice": 0, "grade": 0}
    for result in results:
        mid = result.key
        qids, labels = [q for q, _ in options[mid]], [label for _, label in options[mid]]
        k = len(qids)
        scores = np.array([score_of[mid, q] for q in qids], np.float64)  # the options' own, in their order
        logprobs = number_logprobs(result.first_token, k) if result.ok else None
        choice, grade, choice_ok, grade_ok = readings(qids, labels, result.text, logprobs)
        unreadable["choice"] += not choice_ok
        unreadable["grade"] += not grade_ok
        ids.append(mid)
        retrieval.append(scores)
        graded.append(logprobs if logprobs is not None else np.full(k, -np.log(k)))  # uniform: retrieval decides
        golds.append(qids.index(gold[mid]) if gold[mid] in qids else None)
        hard.append(choice)
        argmax.append(grade)

    folds = out_of_fold(ids, graded, retrieval, golds)
    fused = [int(np.argmax(f.apply(g, r))) for f, g, r in zip(folds, graded, retrieval, strict=True)]
    overall = fit_fusion(graded, retrieval, golds)

    def hits(picks: list[int]) -> np.ndarray:
        return np.array([g is not None and p == g for p, g in zip(picks, golds, strict=True)], np.float64)

    top1 = hits([0] * len(ids))
    asked = [r.call["latency_s"] for r in results if not r.call["cached"]]
    per_call = f", median {np.median(asked):.1f} s a call" if asked else ""
    print(f"\n{len(ids)} {args.split} mentions (K = {args.candidates}), {seconds:.0f} s with the server start "
          f"({len(results) - len(asked)} answers cached{per_call}); unreadable: {unreadable}; "
          f"fusion fitted on all: {overall}; the hard choice named candidate 1 for {hard.count(0)} of {len(hard)}, "
          f"the gold is candidate 1 for {golds.count(0)}\n")
    print("| reading | HITS@1 | gain over retrieval's top-1, paired 95% interval |")
    print("|---|---:|---:|")
    print(f"| retrieval top-1 | {100 * top1.mean():.1f} | |")
    for name, picks in [("LLM hard choice (numbered prompt)", hard), ("LLM probability alone (argmax)", argmax),
                        ("LLM probability fused with retrieval (out-of-fold)", fused)]:
        gain, ci = paired_gain(hits(picks), top1)
        print(f"| {name} | {100 * hits(picks).mean():.1f} | {gain:+.1f} ± {ci:.1f} |")


if __name__ == "__main__":
    main()
