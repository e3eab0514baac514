"""The flows. Each is a chain of stage tasks; skipping comes from artifact keys (see tasks.common)."""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from prefect import flow

from flows.benchmark import benchmark
from flows.chains import artifact_ids, finish, ingest_dataset, retrieval_chain, stage3
from flows.context import open_context
from kgmel_core.config import EncoderConfig, LLMScope, PipelineConfig, explicit_differences, load_config
from kgmel_core.data.datasets import InputLimits
from kgmel_core.variants import variants_for
from storage import Artifact
from storage.registry import ModelVersion
from tasks import embed as embed_tasks
from tasks import evaluate as evaluate_tasks
from tasks import generate as generate_tasks
from tasks import index as index_tasks
from tasks import ingest as ingest_tasks
from tasks import kb as kb_tasks
from tasks import nil as nil_tasks
from tasks import reranker as reranker_tasks
from tasks.common import PipelineContext, logger


def on_runner(flow_fn: Any, config: PipelineConfig) -> Any:
    """The flow on the task runner the config asks for: Prefect's DaskTaskRunner with `runner: dask`
    (an existing scheduler at `dask.address`, else a LocalCluster of worker processes), else as is."""
    if config.runner != "dask":
        return flow_fn
    from prefect_dask import DaskTaskRunner

    if config.dask.address:
        runner = DaskTaskRunner(address=config.dask.address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": config.dask.n_workers,
                "threads_per_worker": config.dask.threads_per_worker,
                "processes": True,
                "dashboard_address": None,
            }
        )
    return flow_fn.with_options(task_runner=runner)


def register_model(ctx: PipelineContext, config: PipelineConfig, chain: dict[str, Artifact],
                   reranker: Artifact | None, nil: Artifact, promote: bool) -> str:
    """Register what full-pipeline trained and indexed (with the reranker trained on its candidates and the
    NIL model fitted on its final lists, where there is one) under the config's model name; one summary line."""
    registry = ctx.store.models
    info = {"dataset": config.dataset.name, "run_id": ctx.run_log.run_id}
    version = registry.register(config.model, chain["train"].key, chain["index"].key, info,
                                reranker=reranker.key if reranker is not None else None,
                                nil=nil.key if nil.tables.get("nil_model") else None)
    if promote:
        registry.promote(config.model, version.number)
    state = registry.state(config.model)
    served = f"v{state.served}" if state.served else "none"
    line = f"model {config.model!r}: this run's retriever is v{version.number}; served: {served}"
    if state.served != version.number:
        line += f" (serve this one with: kgmel models promote {config.model} {version.number})"
    ctx.catalog.refresh()
    return line


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(config: PipelineConfig, promote: bool = False) -> dict[str, Any]:
    """ingest -> [generate] -> embed -> train -> index -> retrieve -> [filter -> rerank] -> evaluate -> fit_nil,
    then register the trained retriever, its index, reranker and NIL model under the model name."""
    ctx = open_context(config, "full-pipeline")
    ingested = ingest_dataset(ctx, config)
    stages: dict[str, Artifact] = {"ingest": ingested}
    generation = None
    if config.generation.enabled:
        generation = stages["generate"] = generate_tasks.generate(ctx, config.generation, ingested)
    retriever_generation = generation if config.retriever.use_mention_triples else None
    chain = retrieval_chain(ctx, config, ingested, retriever_generation)
    stages.update(chain)
    reranked = reranker = None
    if config.rerank.enabled:  # with stage 1's triples and descriptions when generation ran
        embedded = chain["embed"]
        if generation is not None and retriever_generation is None:  # filtering embeds the generated triples
            embedded = stages["embed_generated"] = embed_tasks.embed(
                ctx, config.encoder, ingested, generation, chain.get("clip_bootstrap")
            )
        third = stage3(ctx, config.rerank, ingested, generation, embedded, chain["retrieve"], train_reranker=True)
        stages.update(third)
        reranked, reranker = third["rerank"], third.get("train_reranker")
    metrics = stages["evaluate"] = evaluate_tasks.evaluate(ctx, ingested, chain["embed"], chain["retrieve"], reranked,
                                                           nil=config.nil)
    nil = stages["fit_nil"] = nil_tasks.fit_nil(ctx, config.nil, ingested, chain["retrieve"], reranked)
    registered = register_model(ctx, config, chain, reranker, nil, promote)
    report = finish(ctx, "kgmel full-pipeline", metrics, [registered])
    return {"artifacts": artifact_ids(stages), "report": report, "root": ctx.store.url, "model": registered}


@flow(name="ablations", log_prints=True)
def ablations(config: PipelineConfig) -> dict[str, Any]:
    """Train and evaluate the retriever and its ablations (`kgmel_core.variants`, the `ablations` set) on
    shared ingest/embed artifacts.

    Experiments only: nothing here is registered, so no ablation is ever served."""
    ctx = open_context(config, "ablations")
    ingested = ingest_dataset(ctx, config)
    results = {}
    for label, variant in variants_for("ablations").items():
        chain = retrieval_chain(ctx, variant.config(config), ingested, None)
        results[label] = evaluate_tasks.evaluate(ctx, ingested, chain["embed"], chain["retrieve"], label=label)
    combined = pl.concat([a.read("metrics") for a in results.values()]).unique(maintain_order=True)
    report = finish(ctx, "kgmel ablations", None)
    report.metrics = combined
    return {"report": report, "metrics": combined}


class ServedModelMismatch(ValueError):
    """The live config contradicts the settings the served model was trained with."""


def served_model(ctx: PipelineContext, config: PipelineConfig, model: str | None) -> tuple[ModelVersion, Artifact]:
    """The promoted version of a model name and its trained retriever; refuses a live config whose
    explicit encoder/retriever settings contradict what that retriever was trained with."""
    name = model or config.model
    version = ctx.store.models.require(name).serving
    trained = ctx.store.require("train", version.train)
    trained_config = trained.manifest["config"]
    problems = explicit_differences(config.encoder, trained_config["encoder"], "encoder")
    problems += explicit_differences(config.retriever, trained_config["retriever"], "retriever")
    if problems:
        raise ServedModelMismatch(
            f"model {name!r} v{version.number} (train {trained.key}) was trained with other settings than the "
            "config asks for:\n  " + "\n  ".join(problems) + "\nRemove them from the config to serve this model, "
            "or run full-pipeline to train (and promote) a model with the new settings."
        )
    return version, trained


def served_encoder(
    ctx: PipelineContext, config: PipelineConfig, trained: Artifact
) -> tuple[EncoderConfig, Artifact | None]:
    """The encoder settings a retriever was trained with (runtime knobs from the live config), and the
    CLIP stand-in it used, so new rows are embedded exactly as the retriever knows them."""
    embedded = ctx.store.input(trained, "embed")
    encoder = EncoderConfig.model_validate(
        {**trained.manifest["config"]["encoder"], **config.encoder.model_dump(include={"batch_size", "device"})}
    )
    if "clip_bootstrap" not in embedded.manifest["inputs"]:
        return encoder, None
    return encoder, ctx.store.input(embedded, "clip_bootstrap")


@flow(name="reindex-kb", log_prints=True)
def reindex_kb(config: PipelineConfig, model: str | None = None) -> dict[str, Any]:
    """Re-read the KB, embed only new or changed strings/images, index it with the served retriever (no
    retraining: new entities are appended to the served index while `index.append_max_*` allow, else it
    is rebuilt), and make it the index that model serves. Meant to run on a schedule."""
    ctx = open_context(config, "reindex-kb")
    version, trained = served_model(ctx, config, model)
    encoder, bootstrap = served_encoder(ctx, config, trained)
    ingested = ingest_dataset(ctx, config)
    embedded = embed_tasks.embed(ctx, encoder, ingested, None, bootstrap)
    served = ctx.store.get("index", version.index)  # grown in place of a rebuild when the KB only gained entities
    if served is None:
        logger().warning("index %s that model v%d serves is missing or damaged: building from scratch",
                         version.index, version.number)
    indexed = index_tasks.index(ctx, config.index, trained, ingested, embedded, previous=served)
    name = model or config.model
    ctx.store.models.record_reindex(name, trained.key, indexed.key)
    ctx.catalog.refresh()
    note = f"model {name!r} v{version.number}: serves index {indexed.key} (was {version.index})"
    report = finish(ctx, "kgmel reindex-kb", None, [note])
    return {
        "artifacts": artifact_ids({"train": trained, "ingest": ingested, "embed": embedded, "index": indexed}),
        "report": report,
        "root": ctx.store.url,
    }


def served_nil_model(ctx: PipelineContext, version: ModelVersion, name: str, retrieve: Artifact,
                     reranker: Artifact | None) -> Artifact:
    """The NIL model registered with the served version, refused when it was fitted on other scores."""
    if not version.nil:
        raise ValueError(f"model {name!r} v{version.number} has no NIL model (its full-pipeline run had too few val "
                         "mentions to fit one, or predates it): set nil.enabled=false, or serve a version with one")
    fitted = ctx.store.require("fit_nil", version.nil)
    nil_tasks.check_pairing(ctx, fitted, retrieve, reranker)
    return fitted


@flow(name="link", log_prints=True)
def link(
    config: PipelineConfig,
    mentions_file: str | None = None,
    mentions: list[dict] | None = None,
    image_dir: str | None = None,
    model: str | None = None,
    llm_scope: Literal["given", "config"] = "given",
) -> dict[str, Any]:
    """Link new mentions against the served model's index, without retraining:
    ingest_link -> [generate] -> embed -> retrieve -> [filter -> rerank] -> [decide_nil] -> predictions.

    The LLM stages run on every mention given (`llm_scope="given"`): the configured scope names
    benchmark splits, which new mentions are not in. `"config"` keeps the configured scope."""
    if llm_scope == "given":
        everything = LLMScope()
        config = config.model_copy(
            update={
                "generation": config.generation.model_copy(update={"scope": everything}),
                "rerank": config.rerank.model_copy(update={"scope": everything}),
            }
        )
    ctx = open_context(config, "link")
    version, trained = served_model(ctx, config, model)
    indexed = ctx.store.require("index", version.index)
    if ctx.store.input(indexed, "train").key != trained.key:
        raise RuntimeError(f"index {indexed.key} was not built with model {version.train}: registry out of step")
    encoder, bootstrap = served_encoder(ctx, config, trained)
    kb, kb_embed = ctx.store.input(indexed, "ingest"), ctx.store.input(indexed, "embed")
    ingested = ingest_tasks.ingest_link_mentions(ctx, InputLimits.of(config.dataset), mentions_file, mentions,
                                                 image_dir)
    stages: dict[str, Artifact] = {"ingest_link": ingested, "index": indexed}
    generation = None
    if config.generation.enabled:
        generation = stages["generate"] = generate_tasks.generate(ctx, config.generation, ingested)
    embedded = stages["embed"] = embed_tasks.embed(ctx, encoder, ingested, generation, bootstrap)
    uses_triples = trained.manifest["config"]["retriever"]["use_mention_triples"]
    candidates = stages["retrieve"] = index_tasks.retrieve(
        ctx, config.index, indexed, trained, ingested, embedded, generation if uses_triples else None
    )
    predictions = decisions = reranked = reranker = None
    if config.rerank.enabled:
        if config.rerank.method == "cross_encoder":
            if not version.reranker:
                raise ValueError(f"model {model or config.model!r} v{version.number} has no trained reranker: "
                                 "set rerank.method=llm, rerank.enabled=false, or serve a version trained with one")
            reranker = ctx.store.require("train_reranker", version.reranker)
            config = config.model_copy(update={"rerank": reranker_tasks.as_trained(ctx, config.rerank, reranker)})
        third = stage3(ctx, config.rerank, ingested, generation, embedded, candidates, kb=kb, kb_embed=kb_embed,
                       reranker=reranker)
        stages.update(third)
        reranked = third["rerank"]
        predictions = reranked.read("predictions")
    if config.nil.enabled:
        fitted = served_nil_model(ctx, version, model or config.model, candidates, reranker)
        decided = stages["decide_nil"] = nil_tasks.decide_nil(ctx, config.nil, fitted, ingested, kb, candidates,
                                                               reranked)
        decisions = decided.read("nil_decisions")
    note = f"model {model or config.model!r} v{version.number} (train {trained.key}, index {indexed.key})"
    report = finish(ctx, "kgmel link", None, [note])
    return {
        "artifacts": artifact_ids(stages),
        "candidates": candidates.read("candidates"),
        "predictions": predictions,
        "nil_decisions": decisions,
        "report": report,
        "root": ctx.store.url,
    }


@flow(name="kb-build", log_prints=True)
def kb_build(config: PipelineConfig) -> dict[str, Any]:
    """Build the KB tables from the configured Wikidata dump (`kb.dump`) and nothing else."""
    if not config.kb.dump:
        raise ValueError("kb.dump is not set: give the path of a Wikidata JSON dump (latest-all.json[.gz|.bz2])")
    ctx = open_context(config, "kb-build")
    built = kb_tasks.kb(ctx, config.kb)
    report = finish(ctx, "kgmel kb build", None, [f"KB: {built.tables['entities']} entities, "
                                                 f"{built.tables['kb_triples']} triples ({built.id})"])
    return {"artifacts": artifact_ids({"kb": built}), "report": report, "root": ctx.store.url}


@flow(name="generate-triples", log_prints=True)
def generate_triples(config: PipelineConfig) -> dict[str, Any]:
    """Stage 1 alone: ingest -> generate for the mentions in `generation.scope`, nothing trained.

    The answers are an ordinary `generate` artifact, keyed like the one full-pipeline would build with the
    same settings; a run stopped halfway resumes where it stopped (answered calls come from the cache)."""
    ctx = open_context(config, "generate-triples")
    ingested = ingest_dataset(ctx, config)
    generated = generate_tasks.generate(ctx, config.generation, ingested)
    stats = generated.manifest["stats"]
    line = (f"generate: {stats['in_scope']} of {stats['mentions']} mentions asked, outcomes {stats['status']}, "
            f"{stats['calls_cached']} answers from the cache, {stats['calls_cut_at_max_tokens']} cut at max_tokens "
            f"({generated.id})")
    report = finish(ctx, "kgmel generate", None, [line])
    return {"artifacts": artifact_ids({"ingest": ingested, "generate": generated}), "report": report,
            "root": ctx.store.url}


@flow(name="kgmel", log_prints=True)
def kgmel(
    job: Literal["full-pipeline", "reindex-kb", "link", "ablations", "benchmark", "kb", "generate"] = "full-pipeline",
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    mentions_file: str | None = None,
    image_dir: str | None = None,
    model: str | None = None,
    promote: bool = False,
    llm_scope: Literal["given", "config"] = "given",
    variants: list[str] | None = None,
) -> dict:
    """The deployable entry flow. Deployments `kgmel/full-pipeline`, `kgmel/reindex-kb`, `kgmel/link`
    are this flow with `job` preset, so `prefect deployment run kgmel/<job>` is what users type.
    `model` names the served model `reindex-kb` and `link` use (default: the config's model name);
    `variants` picks the `benchmark` variants to train (default: all)."""
    config = load_config(config_path, overrides)  # validated by pydantic before any work starts
    if job == "full-pipeline":
        result = on_runner(full_pipeline, config)(config, promote=promote)
    elif job == "reindex-kb":
        result = on_runner(reindex_kb, config)(config, model=model)
    elif job == "link":
        if not mentions_file:
            raise ValueError("job 'link' needs mentions_file")
        result = on_runner(link, config)(
            config, mentions_file=mentions_file, image_dir=image_dir, model=model, llm_scope=llm_scope
        )
        for table in ("candidates", "predictions", "nil_decisions"):
            result.pop(table)
    elif job == "kb":
        result = on_runner(kb_build, config)(config)
    elif job == "generate":
        result = on_runner(generate_triples, config)(config)
    elif job == "benchmark":
        result = on_runner(benchmark, config)(config, variants=variants)
    else:
        result = on_runner(ablations, config)(config)
        result.pop("metrics")
    logger().info("%s", result["report"].markdown())
    return result
