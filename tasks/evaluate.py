"""Stage `evaluate`: HITS@k / MRR per split for the retriever, the zero-shot baselines and the reranker."""

from __future__ import annotations

from prefect import task

from kgmel_core import schemas
from kgmel_core.config import NilConfig
from kgmel_core.data.texts import HeadTexts
from kgmel_core.evaluation import OutOfKB, Reranked, Served, evaluate_tables, restrict_to_splits
from kgmel_core.metrics import metrics_markdown
from kgmel_core.nil import train_golds
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.inputs import load_features


@task(name="evaluate", **STAGE_TASK)
def evaluate(
    ctx: PipelineContext,
    ingest: Artifact,
    embed: Artifact,
    retrieve: Artifact | None = None,
    rerank: Artifact | None = None,
    label: str = "kgmel",
    splits: list[str] | None = None,
    nil: NilConfig | None = None,
) -> Artifact:
    """Metrics of what was served (see `kgmel_core.evaluation`). `splits`: evaluate only these (the
    benchmark asks for val alone); None: every split. `nil`: also the out-of-KB evaluation on val."""
    evaluated_splits = sorted(splits) if splits else None

    def build(writer):
        features = load_features(ingest, embed, None, HeadTexts.of(embed.manifest["config"]), max_triples=1)
        mentions = ingest.read("mentions")
        out_of_kb = None
        if nil is not None:
            train_gold = train_golds(mentions)
            out_of_kb = OutOfKB(ingest.read("entities"), train_gold, nil.share, nil.seed, nil.max_in_kb_cost)
        if evaluated_splits is not None:
            features, mentions = restrict_to_splits(features, mentions, evaluated_splits)
        served = reranked = None
        if retrieve is not None:
            served = Served(
                retrieve.read("candidates"), int(retrieve.manifest["stats"]["top_k"]),
                retrieve.read("fused_mentions"), ctx.store.input(retrieve, "index").read("fused_entities"),
            )
        if rerank is not None:
            ranked = rerank.read("reranked") if "reranked" in rerank.tables else None
            sent_all = rerank.manifest["config"].get("margin_threshold") is None
            reranked = Reranked(rerank.read("predictions"), sent_all, ranked)
        result = evaluate_tables(features, mentions, label, served, reranked, out_of_kb)
        writer.write_table("metrics", result.metrics, schemas.METRICS)
        if result.gate_curve is not None:
            writer.write_table("rerank_gate_curve", result.gate_curve, schemas.GATE_CURVE)
        if result.nil_outcomes is not None:
            writer.write_table("nil_outcomes", result.nil_outcomes, schemas.NIL_OUTCOMES)
        writer.stats.update(result.stats)
        logger().debug("metrics:\n%s", metrics_markdown(result.metrics))  # the run summary shows them once

    inputs = {"ingest": ingest, "embed": embed, "retrieve": retrieve, "rerank": rerank}
    nil_config = nil.fitting() if nil else None
    stage_config = {"label": label, "splits": evaluated_splits, "nil": nil_config}
    return run_stage(ctx, "evaluate", stage_config, inputs, build)
