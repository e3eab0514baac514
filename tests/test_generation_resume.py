"""Stage 1 stopped halfway (Ctrl-C, a killed worker) and started again asks no question twice: every answer
reaches the on-disk answer cache as it arrives, so the restart asks only the mentions never answered."""

import pytest
from conftest import small_config
from fake_llm import FakeLLM, install

from storage import ArtifactStore, RunLog
from tasks import common
from tasks.generate import generate
from tasks.ingest import ingest

LLM = {"model": "fake/model", "timeout_s": 3, "retries": 0, "backoff_s": 0.0, "concurrency": 1}


class StoppedAfter(FakeLLM):
    """Answers `limit` calls, then the process is stopped (what SIGINT raises in the middle of a call)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    async def acompletion(self, *args, **kwargs):
        if self.calls == self.limit:
            raise KeyboardInterrupt
        return await super().acompletion(*args, **kwargs)


def test_a_generation_stopped_halfway_resumes_without_asking_any_mention_twice(small_demo, tmp_path):
    config = small_config(small_demo, tmp_path / "artifacts", generation={"enabled": True, "llm": LLM})
    store = ArtifactStore(config.artifacts)
    ctx = common.PipelineContext(store, RunLog(store, "run-1", "test"))
    ingested = ingest.fn(ctx, config.dataset)
    mentions = ingested.read("mentions")
    half = mentions.height // 2

    stopped = StoppedAfter(half)
    install(stopped)
    with pytest.raises(KeyboardInterrupt):
        generate.fn(ctx, config.generation, ingested)
    assert store.keys("generate") == []  # nothing half-written was published

    resumed = FakeLLM()
    install(resumed)
    ctx = common.PipelineContext(store, RunLog(store, "run-2", "test"))
    generated = generate.fn(ctx, config.generation, ingested)
    calls = generated.read("llm_calls")
    assert calls.height == mentions.height
    # Across the stop, every distinct question reached the provider exactly once: `half` before, the rest after.
    assert stopped.calls == half and resumed.calls == calls["prompt_hash"].n_unique() - half
    assert int(calls["cached"].sum()) == mentions.height - resumed.calls
    assert generated.manifest["stats"]["status"] == {"ok": mentions.height}
