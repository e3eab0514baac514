"""Stage `generate` (stage 1 of KGMEL): triples about each mention from the sentence (and image, with a VLM)."""

from __future__ import annotations

import polars as pl
from prefect import task

from kgmel_core import schemas
from kgmel_core.config import GenerationConfig, key_config
from kgmel_core.data.scope import in_scope
from kgmel_core.llm.client import LLMRequest
from kgmel_core.llm.parsing import parse_generation
from kgmel_core.llm.prompts import generation_messages
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
        def requests(send_images: bool) -> list[LLMRequest]:
            return [
                LLMRequest(
                    row["mention_id"],
                    generation_messages(
                        row["sentence"], row["mention"], row["image_path"], config.max_triples, send_images
                    ),
                )
                for row in chosen.iter_rows(named=True)
            ]

        results, model, send_images = [], config.llm.model, False
        if chosen.height:  # no server start, no call, when the scope matches no mention
            results, model, send_images = ask_llm(ctx, config.llm, "generate", requests)
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
