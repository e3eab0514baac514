"""Stage `generate` (stage 1 of KGMEL): triples about each mention from the sentence (and image, with a VLM)."""

from __future__ import annotations

from prefect import task

from kgmel_core import schemas
from kgmel_core.config import GenerationConfig, key_config
from kgmel_core.data.scope import in_scope
from kgmel_core.llm.generation import generation_requests, generation_tables
from kgmel_core.llm.prompts import generation_grammar
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.llm_common import ask_llm, call_stats, calls_table


@task(name="generate", **STAGE_TASK)
def generate(ctx: PipelineContext, config: GenerationConfig, ingest: Artifact) -> Artifact:
    """Stage 1: triples about each mention from the sentence (and image, with a VLM)."""
    stage_config = {
        "llm": key_config(config.llm),
        "max_triples": config.max_triples,
        "scope": config.scope.model_dump(),
    }

    def build(writer):
        mentions = ingest.read("mentions")
        chosen = in_scope(mentions, config.scope)
        results, model, send_images = [], config.llm.model, False
        if chosen.height:  # no server start, no call, when the scope matches no mention
            results, model, send_images = ask_llm(
                ctx, config.llm, "generate", lambda images: generation_requests(chosen, images),
                grammar=generation_grammar(config.max_triples),
            )
        triples, generations = generation_tables(mentions, results, config.max_triples)
        writer.write_table("mention_triples", triples, schemas.MENTION_TRIPLES)
        writer.write_table("mention_generations", generations, schemas.MENTION_GENERATIONS)
        calls = calls_table(results)
        writer.write_table("llm_calls", calls, schemas.LLM_CALLS)
        status = dict(generations.group_by("status").len().iter_rows())
        writer.stats.update(
            call_stats(calls),
            status=status,
            images_sent=send_images,
            model=model,
            mentions=mentions.height,
            in_scope=chosen.height,
        )
        if not send_images:
            writer.stats["note"] = "text-only prompts: no image was sent to the model"
        logger().info("generate: %s", writer.stats)

    return run_stage(
        ctx, "generate", stage_config, {"ingest": ingest}, build, max_attempts=config.llm.max_stage_attempts
    )
