"""Stage 3 with an LLM: ask it about the mentions retrieval is unsure of, and turn its answers into
predictions. A confident mention keeps retrieval's top-1; an unusable answer falls back to it (both
counted, never silent)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from kgmel_core import schemas
from kgmel_core.llm.client import LLMResult
from kgmel_core.llm.parsing import parse_rerank_answer
from kgmel_core.llm.prompts import rerank_requests
from kgmel_core.rerank.candidates import relation_tail_pairs
from kgmel_core.rerank.gate import is_sent


@dataclass
class LLMRerankPlan:
    sent: set[str]  # mentions asked (in scope, margin below the threshold)
    requests: list[tuple[str, list[dict]]]  # (mention_id, messages) of those with candidates
    options: dict[str, list[tuple[str, str]]]  # mention_id -> (qid, label) the answer may name


def plan_llm_rerank(
    scoped: pl.DataFrame,
    candidates: Mapping[str, list[str]],
    margins: Mapping[str, float],
    margin_threshold: float | None,
    entities: pl.DataFrame,
    filtered_triples: pl.DataFrame,
    mention_triples: pl.DataFrame | None,
    mention_generations: pl.DataFrame | None,
    max_description_chars: int,
    layout: str,
) -> LLMRerankPlan:
    """The prompts for the in-scope mentions the gate sends; without stage 1 the sentence alone
    describes the mention."""
    asked = [r for r in scoped.to_dicts() if is_sent(margins.get(r["mention_id"], math.inf), margin_threshold)]
    by_qid = {r["qid"]: r for r in entities.iter_rows(named=True)}
    facts = relation_tail_pairs(filtered_triples, "mention_id", "qid")
    generated, descriptions = {}, {}
    if mention_triples is not None:
        generated = relation_tail_pairs(mention_triples, "mention_id")
    if mention_generations is not None:
        described = mention_generations.filter(pl.col("description").is_not_null())
        descriptions = dict(described.select("mention_id", "description").iter_rows())
    requests, options = rerank_requests(
        asked, candidates, by_qid, facts, generated, descriptions, max_description_chars, layout
    )
    return LLMRerankPlan({r["mention_id"] for r in asked}, requests, options)


def llm_predictions(
    mention_ids: Sequence[str],
    in_scope_ids: set[str],
    plan: LLMRerankPlan,
    candidates: Mapping[str, list[str]],
    margins: Mapping[str, float],
    results: Sequence[LLMResult],
) -> tuple[pl.DataFrame, dict[str, int]]:
    """One PREDICTIONS row per mention, and how many ended each way (llm, confident, fallbacks by
    reason)."""
    by_id = {r.key: r for r in results}
    rows, reasons = [], {}
    for mid in mention_ids:
        top1 = (candidates.get(mid) or [None])[0]
        result = by_id.get(mid)
        source, call_id = "fallback", None
        if mid not in in_scope_ids:
            reason, qid = "out_of_scope", top1
        elif mid not in plan.sent:
            reason, qid, source = "confident", top1, "retrieval"
        elif result is None:
            reason, qid = "no_candidates", top1
        elif not result.ok:
            reason, qid, call_id = "call_failed", top1, result.call["call_id"]
        else:
            qid, how = parse_rerank_answer(result.text, plan.options[mid])
            reason, call_id = (None, result.call["call_id"]) if qid else (how, result.call["call_id"])
            source, qid = ("llm", qid) if qid else ("fallback", top1)
        reasons[reason or "llm"] = reasons.get(reason or "llm", 0) + 1
        rows.append(
            {"mention_id": mid, "qid": qid, "source": source, "reason": reason, "call_id": call_id,
             "margin": margins.get(mid), "answer": result.text if result is not None else None}
        )
    return pl.DataFrame(rows, schema=pl.Schema(schemas.PREDICTIONS)), reasons


def number_logprobs(first_token: Mapping[str, float] | None, options: int) -> np.ndarray | None:
    """Log-probability of each candidate's number (1..`options`) as the first token of the LLM's answer,
    renormalised over the numbers: a grade of every candidate where the answer names one (`numbered`
    prompt layout). A number missing from the alternatives the provider returned gets the least likely
    returned one's probability, an upper bound of its own. None when no number is among them.

    Up to 9 options only: "1" would also begin "10".."16", so its probability would not be the first
    candidate's."""
    if not 1 <= options <= 9:
        raise ValueError(f"a number is one token for 1..9 candidates only, not {options}")
    if not first_token:
        return None
    probability = np.zeros(options)
    for token, logprob in first_token.items():
        text = token.strip()  # " 2" and "2" are different tokens naming the same candidate
        if text.isdigit() and 1 <= int(text) <= options:
            probability[int(text) - 1] += math.exp(logprob)
    if not probability.any():
        return None
    probability[probability == 0] = math.exp(min(first_token.values()))
    return np.log(probability / probability.sum())
