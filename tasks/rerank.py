"""Stages `filter` and `rerank` (stage 3 of KGMEL): keep the candidates' triples that resemble the
mention's generated ones, then let the LLM pick one candidate."""

from __future__ import annotations

import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import RerankConfig, key_config
from kgmel_core.data.scope import in_scope
from kgmel_core.data.texts import HeadTexts
from kgmel_core.factory import create_cross_encoder
from kgmel_core.llm.client import LLMRequest
from kgmel_core.rerank.candidates import candidate_lists
from kgmel_core.rerank.filtering import TextVectors, filter_mentions
from kgmel_core.rerank.fusion import RERANKER_ONLY, Fusion
from kgmel_core.rerank.gate import retrieval_margins
from kgmel_core.rerank.groups import Stage3Mentions
from kgmel_core.rerank.hosted import score_with_api
from kgmel_core.rerank.learned import merged_scores
from kgmel_core.rerank.llm_choice import llm_predictions, plan_llm_rerank
from kgmel_core.retrieval.features import mention_heads
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.llm_common import ask_llm, call_stats, calls_table
from tasks.reranker import as_trained, check_pairing, known_val_scores, stage3_tables


def _generated(generation: Artifact | None, table: str):
    return generation.read(table) if generation is not None else None


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
    stage_config = config.model_dump(include={"filter_n", "max_triples_per_entity", "candidates", "facts"})
    # The learned reranker trains on the train split and is fused on val: it needs their facts too.
    every_mention = config.method == "cross_encoder"
    stage_config["scope"] = "every mention" if every_mention else config.scope.model_dump()

    def build(writer):
        mentions = ingest.read("mentions")
        if not every_mention:
            mentions = in_scope(mentions, config.scope)
        heads = HeadTexts.of(embed.manifest["config"])  # the context is the mention as the retriever embedded it
        result = filter_mentions(
            mentions,
            candidate_lists(retrieve.read("candidates"), config.candidates),
            (kb or ingest).read("kb_triples"),
            _generated(generation, "mention_triples"),
            TextVectors([a.read("text_embeddings") for a in (embed, kb_embed) if a is not None]),
            mention_heads(mentions, heads),
            config.facts,
            config.filter_n,
            config.max_triples_per_entity,
        )
        writer.write_table("filtered_triples", result.kept, schemas.FILTERED_TRIPLES)
        writer.write_table("filter_counts", result.counts, schemas.FILTER_COUNTS)
        writer.stats.update(
            mentions=result.counts.height,
            triples_before=int(result.counts["triples_before"].sum()),
            triples_after=int(result.counts["triples_after"].sum()),
            mentions_ranked_by_context=result.by_context,
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
        "llm": key_config(config.llm),
        **config.model_dump(include={"candidates", "margin_threshold", "max_description_chars", "layout"}),
        "scope": config.scope.model_dump(),
    }

    def build(writer):
        mentions = ingest.read("mentions")
        scoped = in_scope(mentions, config.scope)
        served = retrieve.read("candidates")
        margins = dict(retrieval_margins(served).iter_rows())
        candidates = candidate_lists(served, config.candidates)
        plan = plan_llm_rerank(
            scoped, candidates, margins, config.margin_threshold, (kb or ingest).read("entities"),
            filtered.read("filtered_triples"), _generated(generation, "mention_triples"),
            _generated(generation, "mention_generations"), config.max_description_chars, config.layout,
        )
        results, model = [], config.llm.model
        if plan.requests:  # no server start, no call, when retrieval is confident about every mention
            requests = [LLMRequest(mid, messages) for mid, messages in plan.requests]
            results, model, _ = ask_llm(ctx, config.llm, "rerank", lambda send_images: requests)
        in_scope_ids = set(scoped["mention_id"].to_list())
        predictions, outcomes = llm_predictions(
            mentions["mention_id"].to_list(), in_scope_ids, plan, candidates, margins, results
        )
        writer.write_table("predictions", predictions, schemas.PREDICTIONS)
        calls = calls_table(results)
        writer.write_table("llm_calls", calls, schemas.LLM_CALLS)
        writer.stats.update(
            call_stats(calls), outcomes=outcomes, model=model, mentions=mentions.height, in_scope=scoped.height,
            sent_to_llm=len(plan.sent), margin_threshold=config.margin_threshold,
        )
        logger().info("rerank: %s", writer.stats)

    return run_stage(ctx, "rerank", stage_config, inputs, build, max_attempts=config.llm.max_stage_attempts)


@task(name="rerank", **STAGE_TASK)
def rerank_learned(
    ctx: PipelineContext,
    config: RerankConfig,
    ingest: Artifact,
    generation: Artifact | None,
    retrieve: Artifact,
    filtered: Artifact,
    reranker: Artifact,
    kb: Artifact | None = None,
) -> Artifact:
    """Stage 3 with the learned reranker: every in-scope mention retrieval is unsure about (all of them
    without a margin threshold) gets its candidates reranked by the fused score, a ranked list
    (`reranked`) and its top as the prediction. Val mentions are ranked with their out-of-fold fusion,
    so what `evaluate` reports on val was not fitted on the mention itself."""
    check_pairing(ctx, reranker, retrieve)
    config = as_trained(ctx, config, reranker)  # texts and K exactly as the reranker learned them
    inputs = {"ingest": ingest, "generation": generation, "retrieve": retrieve, "filter": filtered,
              "train_reranker": reranker, "kb": kb}
    stage_config = {"method": config.method, "margin_threshold": config.margin_threshold, "fusion": config.fusion,
                    "scope": config.scope.model_dump()}

    def build(writer):
        at = Stage3Mentions.of(stage3_tables(ingest, retrieve, filtered, generation, kb), config)
        known, folds = known_val_scores(ctx, reranker, retrieve, filtered)
        todo = [g for g in at.sent_groups() if g.mention_id not in known]
        model = create_cross_encoder(config.cross_encoder, trained=reranker.folder("reranker"))
        fresh = model.score(todo, config.cross_encoder.batch_pairs, progress=True)
        scores = merged_scores(at.groups, at.sent, dict(zip([g.mention_id for g in todo], fresh, strict=True)), known)
        overall = Fusion(**reranker.manifest["stats"]["fusion"])
        fusions = [RERANKER_ONLY if config.fusion == "none" else folds.get(g.mention_id, overall) for g in at.groups]
        ranked, predictions, outcomes = at.rank(scores, fusions)
        writer.write_table("reranked", ranked, schemas.RERANKED)
        writer.write_table("predictions", predictions, schemas.PREDICTIONS)
        writer.stats.update(at.stats(), outcomes=outcomes, scored_now=len(todo),
                            scores_reused=len(at.sent_groups()) - len(todo))
        logger().info("rerank: %s", writer.stats)

    return run_stage(ctx, "rerank", stage_config, inputs, build)


@task(name="rerank", **STAGE_TASK)
def rerank_hosted(
    ctx: PipelineContext,
    config: RerankConfig,
    ingest: Artifact,
    generation: Artifact | None,
    retrieve: Artifact,
    filtered: Artifact,
    kb: Artifact | None = None,
) -> Artifact:
    """Stage 3 with a hosted reranker (`rerank.method: api`): every in-scope mention retrieval is unsure
    about gets its candidates ranked by the provider's relevance scores; a failed call keeps retrieval's
    order and is recorded in `llm_calls` and counted as a fallback."""
    inputs = {"ingest": ingest, "generation": generation, "retrieve": retrieve, "filter": filtered, "kb": kb}
    stage_config = {"method": config.method, "api": key_config(config.api), "candidates": config.candidates,
                    "texts": key_config(config.cross_encoder), "margin_threshold": config.margin_threshold,
                    "scope": config.scope.model_dump()}

    def build(writer):
        at = Stage3Mentions.of(stage3_tables(ingest, retrieve, filtered, generation, kb), config)
        asked = at.sent_groups()
        scores, calls = score_with_api(asked, config.api)
        by_id = dict(zip([g.mention_id for g in asked], scores, strict=True))
        failed = {g.mention_id: row["call_id"] for g, row in zip(asked, calls, strict=True) if row["status"] != "ok"}
        ranked, predictions, outcomes = at.rank([by_id.get(g.mention_id) for g in at.groups],
                                                [RERANKER_ONLY] * len(at.groups), failed, source_name="api")
        calls_frame = pl.DataFrame(calls, schema=pl.Schema(schemas.LLM_CALLS))
        writer.write_table("reranked", ranked, schemas.RERANKED)
        writer.write_table("predictions", predictions, schemas.PREDICTIONS)
        writer.write_table("llm_calls", calls_frame, schemas.LLM_CALLS)
        writer.stats.update(call_stats(calls_frame) | at.stats(), outcomes=outcomes, model=config.api.model)
        logger().info("rerank: %s", writer.stats)

    return run_stage(ctx, "rerank", stage_config, inputs, build)
