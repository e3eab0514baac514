"""Stages `filter` and `rerank` (stage 3 of KGMEL): keep the candidates' triples that resemble the
mention's generated ones, then let the LLM pick one candidate."""

from __future__ import annotations

import math

import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import RerankConfig
from kgmel_core.data.texts import text_sha
from kgmel_core.llm.client import LLMRequest
from kgmel_core.llm.filtering import Triple, filter_triples
from kgmel_core.llm.gate import is_sent, retrieval_margins
from kgmel_core.llm.parsing import parse_rerank_answer
from kgmel_core.llm.prompts import rerank_requests
from kgmel_core.retrieval.features import triple_texts
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.llm_common import ask_llm, call_stats, calls_table, in_scope, llm_key_config


def candidate_lists(retrieve: Artifact, k: int) -> dict[str, list[str]]:
    """mention_id -> its top-k candidate QIDs in retrieval order."""
    frame = retrieve.read("candidates").filter(pl.col("rank") <= k).sort("mention_id", "rank")
    return {m: q for m, q in frame.group_by("mention_id", maintain_order=True).agg("qid").iter_rows()}


def relation_tail_pairs(frame: pl.DataFrame, *keys: str) -> dict:
    """(relation, tail) pairs of a triples table grouped by its key column(s), in table order."""
    grouped: dict = {}
    for row in frame.iter_rows(named=True):
        key = row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
        grouped.setdefault(key, []).append((row["relation"], row["tail"]))
    return grouped


@task(name="filter", **STAGE_TASK)
def filter_stage(
    ctx: PipelineContext,
    config: RerankConfig,
    ingest: Artifact,
    generation: Artifact | None,
    embed: Artifact,
    retrieve: Artifact,
    kb: Artifact | None = None,
    kb_embed: Artifact | None = None,
) -> Artifact:
    """Keep the candidates' KB triples that share relations/tails with the mention's generated ones.

    `kb`/`kb_embed` (the link flow): the KB and its embeddings live in other artifacts than the mentions.
    """
    inputs = {"ingest": ingest, "generation": generation, "embed": embed, "retrieve": retrieve, "kb": kb}
    inputs["kb_embed"] = kb_embed
    stage_config = config.model_dump(include={"filter_n", "max_triples_per_entity", "candidates", "use_filter"})
    stage_config["scope"] = config.scope.model_dump()

    def build(writer):
        chosen = in_scope(ingest.read("mentions"), config.scope)
        candidates = candidate_lists(retrieve, config.candidates)
        kb_triples = triple_texts((kb or ingest).read("kb_triples"))
        by_entity: dict[str, list[Triple]] = {}
        for row in kb_triples.iter_rows(named=True):
            by_entity.setdefault(row["head_qid"], []).append(
                Triple(row["head_qid"], row["relation"], row["tail"], row["relation_text"], row["tail_text"])
            )
        generated = triple_texts(
            generation.read("mention_triples") if generation is not None
            else pl.DataFrame(schema={"mention_id": pl.String, "relation": pl.String, "tail": pl.String})
        )
        per_mention = {
            m: (r, t) for m, r, t in generated.group_by("mention_id").agg("relation_text", "tail_text").iter_rows()
        }
        text_table = pl.concat([a.read("text_embeddings") for a in (embed, kb_embed) if a is not None])
        text_table = text_table.unique("text_sha", maintain_order=True)
        vectors_matrix = schemas.vector_matrix(text_table["vector"])
        row_of = {sha: i for i, sha in enumerate(text_table["text_sha"].to_list())}

        class Lookup(dict):
            def __missing__(self, text):
                value = vectors_matrix[row_of[text_sha(text)]]
                self[text] = value
                return value

        vectors = Lookup()
        kept_rows, counts, unfiltered = [], [], 0
        for mention_id in chosen["mention_id"].to_list():
            pool = [t for qid in candidates.get(mention_id, []) for t in by_entity.get(qid, [])]
            relations, tails = per_mention.get(mention_id, ([], []))
            if not config.use_filter:
                relations, tails = [], []
            kept, applied = filter_triples(
                pool, relations, tails, vectors, config.filter_n, config.max_triples_per_entity
            )
            unfiltered += not applied
            kept_rows += [
                {"mention_id": mention_id, "qid": t.qid, "relation": t.relation, "tail": t.tail} for t in kept
            ]
            counts.append({"mention_id": mention_id, "triples_before": len(pool), "triples_after": len(kept)})
        writer.write_table(
            "filtered_triples",
            pl.DataFrame(kept_rows, schema=pl.Schema(schemas.FILTERED_TRIPLES)),
            schemas.FILTERED_TRIPLES,
        )
        counts = pl.DataFrame(counts, schema=pl.Schema(schemas.FILTER_COUNTS))
        writer.write_table("filter_counts", counts, schemas.FILTER_COUNTS)
        writer.stats.update(
            mentions=counts.height,
            triples_before=int(counts["triples_before"].sum()),
            triples_after=int(counts["triples_after"].sum()),
            mentions_without_generated_triples=unfiltered,
        )

    return run_stage(ctx, "filter", stage_config, inputs, build)


@task(name="rerank", **STAGE_TASK)
def rerank(
    ctx: PipelineContext,
    config: RerankConfig,
    ingest: Artifact,
    generation: Artifact | None,
    retrieve: Artifact,
    filtered: Artifact,
    kb: Artifact | None = None,
) -> Artifact:
    """Stage 3: the LLM picks one candidate for each in-scope mention retrieval is unsure about
    (margin below `margin_threshold`; all of them without one); a confident mention keeps retrieval's
    top-1, and an unusable answer falls back to it (both counted)."""
    inputs = {"ingest": ingest, "generation": generation, "retrieve": retrieve, "filter": filtered, "kb": kb}
    stage_config = {
        "llm": llm_key_config(config.llm),
        **config.model_dump(include={"candidates", "margin_threshold", "max_description_chars", "layout"}),
        "scope": config.scope.model_dump(),
    }

    def build(writer):
        mentions = ingest.read("mentions")
        scoped = in_scope(mentions, config.scope)
        in_scope_ids = set(scoped["mention_id"].to_list())
        margins = dict(retrieval_margins(retrieve.read("candidates")).iter_rows())
        threshold = config.margin_threshold
        asked = [r for r in scoped.to_dicts() if is_sent(margins.get(r["mention_id"], math.inf), threshold)]
        sent = {r["mention_id"] for r in asked}
        candidates = candidate_lists(retrieve, config.candidates)
        entities = {r["qid"]: r for r in (kb or ingest).read("entities").iter_rows(named=True)}
        facts = relation_tail_pairs(filtered.read("filtered_triples"), "mention_id", "qid")
        generated, descriptions = {}, {}  # without stage 1: the sentence alone describes the mention
        if generation is not None:
            generated = relation_tail_pairs(generation.read("mention_triples"), "mention_id")
            descriptions = dict(
                generation.read("mention_generations").filter(pl.col("description").is_not_null())
                .select("mention_id", "description").iter_rows()
            )
        pairs, options = rerank_requests(
            asked, candidates, entities, facts, generated, descriptions, config.max_description_chars, config.layout
        )
        results, model = [], config.llm.model
        if pairs:  # no server start, no call, when retrieval is confident about every mention
            requests = [LLMRequest(mid, messages) for mid, messages in pairs]
            results, model, _ = ask_llm(ctx, config.llm, "rerank", lambda send_images: requests)
        by_id = {r.key: r for r in results}
        rows, reasons = [], {}
        for mid in mentions["mention_id"].to_list():
            top1 = (candidates.get(mid) or [None])[0]
            result = by_id.get(mid)
            source, call_id = "fallback", None
            if mid not in in_scope_ids:
                reason, qid = "out_of_scope", top1
            elif mid not in sent:
                reason, qid, source = "confident", top1, "retrieval"
            elif result is None:
                reason, qid = "no_candidates", top1
            elif not result.ok:
                reason, qid, call_id = "call_failed", top1, result.call["call_id"]
            else:
                qid, how = parse_rerank_answer(result.text, options[mid])
                reason, call_id = (None, result.call["call_id"]) if qid else (how, result.call["call_id"])
                source, qid = ("llm", qid) if qid else ("fallback", top1)
            reasons[reason or "llm"] = reasons.get(reason or "llm", 0) + 1
            rows.append(
                {"mention_id": mid, "qid": qid, "source": source, "reason": reason, "call_id": call_id,
                 "margin": margins.get(mid), "answer": result.text if result is not None else None}
            )
        writer.write_table(
            "predictions", pl.DataFrame(rows, schema=pl.Schema(schemas.PREDICTIONS)), schemas.PREDICTIONS
        )
        calls = calls_table(results)
        writer.write_table("llm_calls", calls, schemas.LLM_CALLS)
        writer.stats.update(
            call_stats(calls), outcomes=reasons, model=model, mentions=mentions.height, in_scope=scoped.height,
            sent_to_llm=len(sent), margin_threshold=config.margin_threshold,
        )
        logger().info("rerank: %s", writer.stats)

    return run_stage(ctx, "rerank", stage_config, inputs, build, max_attempts=config.llm.max_stage_attempts)
