"""Stages `filter` and `rerank` (stage 3 of KGMEL): keep the candidates' triples that resemble the
mention's generated ones, then let the LLM pick one candidate."""

from __future__ import annotations

from prefect import task

from kgmel_core import schemas
from kgmel_core.config import RerankConfig
from kgmel_core.data.scope import in_scope
from kgmel_core.llm.client import LLMRequest
from kgmel_core.rerank.candidates import candidate_lists
from kgmel_core.rerank.filtering import TextVectors, filter_mentions
from kgmel_core.rerank.gate import retrieval_margins
from kgmel_core.rerank.llm_choice import llm_predictions, plan_llm_rerank
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.llm_common import ask_llm, call_stats, calls_table, llm_key_config


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
    stage_config = config.model_dump(include={"filter_n", "max_triples_per_entity", "candidates", "use_filter"})
    stage_config["scope"] = config.scope.model_dump()

    def build(writer):
        result = filter_mentions(
            in_scope(ingest.read("mentions"), config.scope)["mention_id"].to_list(),
            candidate_lists(retrieve.read("candidates"), config.candidates),
            (kb or ingest).read("kb_triples"),
            _generated(generation, "mention_triples"),
            TextVectors([a.read("text_embeddings") for a in (embed, kb_embed) if a is not None]),
            config.filter_n,
            config.max_triples_per_entity,
            config.use_filter,
        )
        writer.write_table("filtered_triples", result.kept, schemas.FILTERED_TRIPLES)
        writer.write_table("filter_counts", result.counts, schemas.FILTER_COUNTS)
        writer.stats.update(
            mentions=result.counts.height,
            triples_before=int(result.counts["triples_before"].sum()),
            triples_after=int(result.counts["triples_after"].sum()),
            mentions_without_generated_triples=result.unfiltered,
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
