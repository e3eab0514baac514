"""Stages `generate` (VLM triples), `filter` (triple filtering) and `rerank` (LLM picks a candidate)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import GenerationConfig, LLMConfig, LLMScope, RerankConfig
from kgmel_core.data.texts import text_sha
from kgmel_core.llm.client import LLMClient, LLMRequest
from kgmel_core.llm.filtering import Triple, filter_triples
from kgmel_core.llm.local import LOCAL_MODEL_NAME, local_llm_server
from kgmel_core.llm.parsing import parse_generation, parse_rerank_answer
from kgmel_core.llm.prompts import GENERATION_STOP, RERANK_STOP, generation_messages, rerank_requests
from kgmel_core.retrieval.features import triple_texts
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, input_keys, logger, run_stage

GENERATE_VERSION = "1"
FILTER_VERSION = "1"
RERANK_VERSION = "1"
# Settings that change how calls are made, not what they answer: kept out of artifact keys.
_RUNTIME_ONLY = {"timeout_s", "retries", "backoff_s", "concurrency"}


def llm_key_config(config: LLMConfig) -> dict:
    return config.model_dump(exclude=_RUNTIME_ONLY)


def text_mode(config: LLMConfig) -> bool:
    return config.api == "text" or (config.api == "auto" and config.model == "local")


@contextmanager
def llm_client(
    ctx: PipelineContext, config: LLMConfig, stage: str, stop: list[str]
) -> Iterator[tuple[LLMClient, bool]]:
    """A client for the configured model, plus whether images are sent. `local` starts the packaged
    model's server for the duration of the stage."""
    cache_dir = ctx.store.root / "_llm_cache"
    as_text = text_mode(config)
    if config.model == "local":
        if config.vision == "yes":
            raise ValueError("llm.vision=yes, but the packaged local model is text-only; use a VLM provider")
        with local_llm_server(parallel=min(config.concurrency, 4)) as api_base:
            prefix = "text-completion-openai" if as_text else "openai"
            client = LLMClient(
                config,
                stage,
                cache_dir,
                api_base=api_base,
                model=f"{prefix}/{LOCAL_MODEL_NAME}",
                text_mode=as_text,
                stop=stop,
            )
            try:
                yield client, False
            finally:
                client.close()
    else:
        client = LLMClient(config, stage, cache_dir, text_mode=as_text, stop=stop)
        try:
            yield client, config.vision != "no" and not as_text
        finally:
            client.close()


def in_scope(mentions: pl.DataFrame, scope: LLMScope) -> pl.DataFrame:
    chosen = mentions if scope.splits is None else mentions.filter(pl.col("split").is_in(scope.splits))
    chosen = chosen.sort("mention_id")
    return chosen.head(scope.max_mentions) if scope.max_mentions else chosen


def _calls_table(results) -> pl.DataFrame:
    return pl.DataFrame([r.call for r in results], schema=pl.Schema(schemas.LLM_CALLS))


def _call_stats(calls: pl.DataFrame) -> dict:
    return {
        "calls": calls.height,
        "calls_cached": int(calls["cached"].sum()),
        "calls_failed": int((calls["status"] != "ok").sum()),
        "tokens_in": int(calls["tokens_in"].sum()),
        "tokens_out": int(calls["tokens_out"].sum()),
    }


@task(name="generate", **STAGE_TASK)
def generate(ctx: PipelineContext, config: GenerationConfig, ingest: Artifact) -> Artifact:
    """Stage 1: triples about each mention from the sentence (and image, with a VLM)."""
    stage_config = {
        "llm": llm_key_config(config.llm),
        "max_triples": config.max_triples,
        "scope": config.scope.model_dump(),
    }

    def build(writer):
        mentions = ingest.read("mentions")
        chosen = in_scope(mentions, config.scope)
        with llm_client(ctx, config.llm, "generate", GENERATION_STOP) as (client, send_images):
            requests = [
                LLMRequest(
                    row["mention_id"],
                    generation_messages(
                        row["sentence"],
                        row["mention"],
                        row["image_path"],
                        config.max_triples,
                        send_images,
                        instruction=not text_mode(config.llm),
                    ),
                )
                for row in chosen.iter_rows(named=True)
            ]
            results = client.run(requests)
        triples, generations = [], []
        by_id = {r.key: r for r in results}
        for row in mentions.iter_rows(named=True):
            result = by_id.get(row["mention_id"])
            if result is None:
                generations.append({"mention_id": row["mention_id"], "status": "skipped", "n_triples": 0})
                continue
            if not result.ok:
                generations.append(
                    {
                        "mention_id": row["mention_id"],
                        "status": "call_failed",
                        "n_triples": 0,
                        "raw_text": result.call["error"],
                        "call_id": result.call["call_id"],
                    }
                )
                continue
            parsed = parse_generation(result.text, row["mention"], config.max_triples)
            triples += [
                {"mention_id": row["mention_id"], "relation": r, "tail": t, "call_id": result.call["call_id"]}
                for r, t in parsed.triples
            ]
            generations.append(
                {
                    "mention_id": row["mention_id"],
                    "entity_type": parsed.entity_type,
                    "description": parsed.description,
                    "n_triples": len(parsed.triples),
                    "status": "ok" if parsed.ok else "parse_failed",
                    "raw_text": result.text,
                    "call_id": result.call["call_id"],
                }
            )
        generations = pl.DataFrame(generations, schema=pl.Schema(schemas.MENTION_GENERATIONS))
        writer.write_table(
            "mention_triples", pl.DataFrame(triples, schema=pl.Schema(schemas.MENTION_TRIPLES)), schemas.MENTION_TRIPLES
        )
        writer.write_table("mention_generations", generations, schemas.MENTION_GENERATIONS)
        calls = _calls_table(results)
        writer.write_table("llm_calls", calls, schemas.LLM_CALLS)
        status = dict(generations.group_by("status").len().iter_rows())
        writer.stats.update(
            _call_stats(calls),
            status=status,
            images_sent=send_images,
            model=client.model,
            mentions=mentions.height,
            in_scope=chosen.height,
        )
        if not send_images:
            writer.stats["note"] = "text-only prompts: no image was sent to the model"
        logger().info("generate: %s", writer.stats)

    return run_stage(ctx, "generate", GENERATE_VERSION, stage_config, input_keys(ingest=ingest), build)


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
    generation: Artifact,
    embed: Artifact,
    retrieve: Artifact,
    kb: Artifact | None = None,
    kb_embed: Artifact | None = None,
) -> Artifact:
    """Keep the candidates' KB triples that share relations/tails with the mention's generated ones.

    `kb`/`kb_embed` (the link flow): the KB and its embeddings live in other artifacts than the mentions.
    """
    inputs = input_keys(ingest=ingest, generation=generation, embed=embed, retrieve=retrieve, kb=kb, kb_embed=kb_embed)
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
        generated = triple_texts(generation.read("mention_triples"))
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

    return run_stage(ctx, "filter", FILTER_VERSION, stage_config, inputs, build)


@task(name="rerank", **STAGE_TASK)
def rerank(
    ctx: PipelineContext,
    config: RerankConfig,
    ingest: Artifact,
    generation: Artifact,
    retrieve: Artifact,
    filtered: Artifact,
    kb: Artifact | None = None,
) -> Artifact:
    """Stage 3: the LLM picks one candidate; anything else falls back to retrieval top-1 (counted)."""
    inputs = input_keys(ingest=ingest, generation=generation, retrieve=retrieve, filter=filtered, kb=kb)
    stage_config = {
        "llm": llm_key_config(config.llm),
        "candidates": config.candidates,
        "scope": config.scope.model_dump(),
    }

    def build(writer):
        mentions = ingest.read("mentions")
        asked = in_scope(mentions, config.scope)
        chosen = set(asked["mention_id"].to_list())
        candidates = candidate_lists(retrieve, config.candidates)
        entities = {r["qid"]: r for r in (kb or ingest).read("entities").iter_rows(named=True)}
        facts = relation_tail_pairs(filtered.read("filtered_triples"), "mention_id", "qid")
        generated = relation_tail_pairs(generation.read("mention_triples"), "mention_id")
        pairs, options = rerank_requests(
            asked.to_dicts(), candidates, entities, facts, generated, instruction=not text_mode(config.llm)
        )
        requests = [LLMRequest(mid, messages) for mid, messages in pairs]
        with llm_client(ctx, config.llm, "rerank", RERANK_STOP) as (client, _):
            results = client.run(requests)
        by_id = {r.key: r for r in results}
        rows, reasons = [], {}
        for mid in mentions["mention_id"].to_list():
            top1 = (candidates.get(mid) or [None])[0]
            result = by_id.get(mid)
            if result is None:
                reason, qid, call_id = ("out_of_scope" if mid not in chosen else "no_candidates"), top1, None
            elif not result.ok:
                reason, qid, call_id = "call_failed", top1, result.call["call_id"]
            else:
                qid, how = parse_rerank_answer(result.text, options[mid])
                reason, call_id = (None, result.call["call_id"]) if qid else (how, result.call["call_id"])
                qid = qid or top1
            reasons[reason or "llm"] = reasons.get(reason or "llm", 0) + 1
            rows.append(
                {
                    "mention_id": mid,
                    "qid": qid,
                    "source": "fallback" if reason else "llm",
                    "reason": reason,
                    "call_id": call_id,
                }
            )
        writer.write_table(
            "predictions", pl.DataFrame(rows, schema=pl.Schema(schemas.PREDICTIONS)), schemas.PREDICTIONS
        )
        calls = _calls_table(results)
        writer.write_table("llm_calls", calls, schemas.LLM_CALLS)
        writer.stats.update(_call_stats(calls), outcomes=reasons, model=client.model)
        logger().info("rerank: %s", writer.stats)

    return run_stage(ctx, "rerank", RERANK_VERSION, stage_config, inputs, build)
