"""The LLM stages inside the real full-pipeline flow, against the fake provider with injected failures."""

import polars as pl
import pytest
from conftest import small_config
from fake_llm import FakeLLM, install

from flows.pipeline import full_pipeline
from storage import ArtifactStore

pytestmark = pytest.mark.slow
LLM = {"model": "fake/model", "timeout_s": 3, "retries": 0, "backoff_s": 0.0, "concurrency": 8}


def _read(result, label, table):
    stage, key = result["artifacts"][label].split("/")
    return ArtifactStore(result["root"]).require(stage, key).read(table)


def test_twenty_percent_failures_lose_no_mention_and_a_rerun_recalls_only_the_failures(
    prefect_harness, small_demo, tmp_path
):
    fake = FakeLLM(failure_rate=0.1, timeout_rate=0.05, garbage_rate=0.05, seed=11)
    install(fake)
    config = small_config(
        small_demo,
        tmp_path / "artifacts",
        generation={"enabled": True, "llm": LLM},
        rerank={"enabled": True, "method": "llm", "llm": LLM, "candidates": 4, "filter_n": 2, "margin_threshold": None},
    )
    result = full_pipeline(config)
    mentions = _read(result, "ingest", "mentions")
    generations = _read(result, "generate", "mention_generations")
    predictions = _read(result, "rerank", "predictions")
    assert sorted(generations["mention_id"]) == sorted(mentions["mention_id"])  # every mention has a row
    status = dict(generations.group_by("status").len().iter_rows())
    assert status.get("ok", 0) > 0 and status.get("call_failed", 0) > 0 and status.get("parse_failed", 0) > 0
    failed = generations.filter(pl.col("status") == "call_failed")
    assert failed["raw_text"].str.contains("503|Timeout").all()  # the cause is recorded
    assert sorted(predictions["mention_id"]) == sorted(mentions["mention_id"])
    sources = dict(predictions.group_by("source").len().iter_rows())
    assert sources.get("llm", 0) > 0 and sources.get("fallback", 0) > 0
    assert (
        predictions.filter(pl.col("source") == "fallback")["reason"]
        .is_in(["call_failed", "unparsed", "qid_not_in_candidates"])
        .all()
    )
    calls = _read(result, "generate", "llm_calls")
    assert calls.height == mentions.height and set(calls["status"]) <= {"ok", "error", "timeout"}
    counts = _read(result, "filter", "filter_counts")
    assert (counts["triples_after"] <= counts["triples_before"]).all()
    metrics = _read(result, "evaluate", "metrics")
    assert {"kgmel + rerank", "kgmel top-1 (same mentions)", "kgmel + adaptive rerank (knee)"} <= set(metrics["method"])

    # The outage is over: a re-run re-executes the LLM stages, but only the failed calls reach the provider
    # (every earlier success comes from the answer cache), and the artifacts say it was a second attempt.
    gen_calls = _read(result, "generate", "llm_calls")
    answered = set(gen_calls.filter(pl.col("status") == "ok")["prompt_hash"])
    # a failed prompt that another mention's identical prompt got answered is now an answer cache hit
    gen_failed = len(set(gen_calls.filter(pl.col("status") != "ok")["prompt_hash"]) - answered)
    healthy = FakeLLM()
    install(healthy)
    again = full_pipeline(config)
    assert healthy.generation_calls == gen_failed
    regenerated = ArtifactStore(again["root"]).require(*again["artifacts"]["generate"].split("/"))
    assert regenerated.manifest["stats"]["attempt"] == 2 and regenerated.manifest["stats"]["calls_failed"] == 0
    assert _read(again, "rerank", "llm_calls")["status"].to_list() == ["ok"] * mentions.height
    # Nothing failed any more: the next run is a cache hit everywhere and calls nobody.
    calls_before = healthy.calls
    third = full_pipeline(config)
    assert third["artifacts"] == again["artifacts"] and healthy.calls == calls_before

    # New mentions through the link flow: generate -> embed -> retrieve -> filter -> rerank, KB from the index.
    from flows.pipeline import link

    label = mentions["mention"][0]
    linked = link(config, mentions=[{"id": "new", "sentence": f"A photo of {label} near Peru.", "mention": [label]}])
    assert linked["predictions"].select("mention_id", "qid", "source", "reason", "call_id").rows() == [
        ("new-0", linked["candidates"]["qid"][0], "llm", None, linked["predictions"]["call_id"][0])
    ]
    assert _read(linked, "filter", "filter_counts")["triples_before"][0] > 0  # KB triples came from the KB's artifact
    assert healthy.calls == calls_before + 2  # one generation and one rerank call for the new mention
