import os
from pathlib import Path

import litellm
import numpy as np
import pytest
from fake_llm import FakeLLM, install

from kgmel_core.config import LLMConfig
from kgmel_core.llm.client import LLMClient, LLMRequest, image_data_url, prompt_hash
from kgmel_core.llm.prompts import generation_messages


def _requests(n):
    return [LLMRequest(str(i), [{"role": "user", "content": f"Sentence: s{i}\nMention: m\nType:"}]) for i in range(n)]


def _client(tmp_path, **config):
    settings = {"model": "fake/model", "timeout_s": 3, "retries": 2, "backoff_s": 0.0, "concurrency": 8, **config}
    return LLMClient(LLMConfig(**settings), "generate", tmp_path / "cache")


def test_cache_hit_makes_zero_calls(tmp_path):
    fake = FakeLLM()
    install(fake)
    first = _client(tmp_path).run(_requests(5), progress=False)
    assert fake.calls == 5 and not any(r.call["cached"] for r in first)
    second = _client(tmp_path).run(_requests(5), progress=False)
    assert fake.calls == 5  # nothing new reached the provider
    assert all(r.call["cached"] for r in second) and [r.text for r in second] == [r.text for r in first]
    assert second[0].call["tokens_in"] == first[0].call["tokens_in"]


def test_first_token_logprobs_are_kept_and_cached_when_asked(tmp_path):
    fake = FakeLLM(answer=lambda prompt: "2")
    install(fake)
    settings = LLMConfig(model="fake/model", timeout_s=3, retries=0, backoff_s=0.0)
    plain = LLMClient(settings, "rerank", tmp_path / "cache").run(_requests(1), progress=False)[0]
    assert plain.first_token is None  # not asked: nothing requested from the provider
    asked = LLMClient(settings, "rerank", tmp_path / "cache", top_logprobs=5)
    first = asked.run(_requests(1), progress=False)[0]
    again = asked.run(_requests(1), progress=False)[0]
    assert fake.calls == 2  # asking for logprobs is another request: it did not reuse the plain answer
    assert first.first_token == {"2": 0.0} and again.call["cached"] and again.first_token == {"2": 0.0}


def test_injected_failures_are_retried_then_recorded_never_lost(tmp_path):
    fake = FakeLLM(failure_rate=0.15, timeout_rate=0.05, seed=7)
    install(fake)
    results = _client(tmp_path, retries=1).run(_requests(40), progress=False)
    assert [r.key for r in results] == [str(i) for i in range(40)]  # one result per request, in order
    statuses = {r.call["status"] for r in results}
    assert "ok" in statuses and statuses <= {"ok", "error", "timeout"}
    assert any(r.call["attempts"] == 2 and r.ok for r in results)  # a retry rescued a call
    for r in results:
        assert r.ok == (r.call["status"] == "ok")
        if not r.ok:
            assert r.call["error"] and r.text is None


def test_failures_are_not_cached(tmp_path):
    install(FakeLLM(failure_rate=1.0))
    assert not _client(tmp_path, retries=0).run(_requests(2), progress=False)[0].ok
    fake = FakeLLM()
    install(fake)
    assert all(r.ok for r in _client(tmp_path).run(_requests(2), progress=False)) and fake.calls == 2


def test_non_transient_error_is_not_retried(tmp_path):
    class BadRequest(FakeLLM):
        async def acompletion(self, *args, **kwargs):
            self.calls += 1
            raise litellm.BadRequestError(message="model has no vision", model="fake/model", llm_provider="fake")

    fake = BadRequest()
    install(fake)
    result = _client(tmp_path).run(_requests(1), progress=False)[0]
    assert fake.calls == 1 and result.call["attempts"] == 1 and "no vision" in result.call["error"]


def test_images_go_as_openai_image_url_data_urls(small_demo):
    image = next((small_demo / "kb" / "images").glob("*.png"))
    with_image = generation_messages("s", "m", str(image), send_image=True)[1]["content"]  # [system, user]
    assert with_image[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert image_data_url(image) == with_image[1]["image_url"]["url"]
    assert isinstance(generation_messages("s", "m", str(image), send_image=False)[1]["content"], str)


@pytest.mark.slow
def test_packaged_local_model_answers_through_litellm(tmp_path):
    """The real packaged Qwen2.5-Coder-1.5B-Instruct on llama.cpp: one rerank question, answered with a QID;
    asked with numbered candidates, its first token's alternatives grade them."""
    pytest.importorskip("xllamacpp")
    from kgmel_core.llm.local import LOCAL_MODEL_NAME, local_llm_server
    from kgmel_core.llm.parsing import parse_rerank_answer
    from kgmel_core.llm.prompts import CandidateCard, rerank_messages
    from kgmel_core.rerank.llm_choice import number_logprobs

    cards = [
        CandidateCard("Q41421", "Michael Jordan", "American basketball player", [("occupation", "basketball player")]),
        CandidateCard("Q810", "Jordan", "country in Western Asia", [("instance of", "country")]),
    ]
    sentence = "Jordan scored 40 points for the Bulls."
    config = LLMConfig(model="local", max_tokens=12, timeout_s=300)
    with local_llm_server(parallel=1) as api_base:
        client = LLMClient(config, "rerank", None, api_base=api_base, model=f"openai/{LOCAL_MODEL_NAME}")
        [result] = client.run([LLMRequest("m", rerank_messages(sentence, "Jordan", None, [], cards))], progress=False)
        grading = LLMClient(config, "rerank", None, api_base=api_base, model=f"openai/{LOCAL_MODEL_NAME}",
                            top_logprobs=10)
        numbered = rerank_messages(sentence, "Jordan", None, [], cards, layout="numbered")
        [graded] = grading.run([LLMRequest("m", numbered)], progress=False)
    assert result.ok, result.call["error"]
    assert result.call["tokens_in"] > 60 and result.call["tokens_out"] > 0
    assert parse_rerank_answer(result.text, [(c.qid, c.label) for c in cards])[0] == "Q41421", result.text
    logprobs = number_logprobs(graded.first_token, len(cards))
    assert logprobs is not None and int(np.argmax(logprobs)) == 0, graded.first_token


@pytest.mark.slow
def test_packaged_local_model_writes_parseable_compact_triples_under_the_grammar():
    """The real server takes stage 1's grammar (a GBNF syntax error would fail every call) and the answer
    comes back in the compact format, within the fact bound."""
    pytest.importorskip("xllamacpp")
    from kgmel_core.llm.local import LOCAL_MODEL_NAME, local_llm_server
    from kgmel_core.llm.parsing import parse_generation
    from kgmel_core.llm.prompts import generation_grammar

    messages = generation_messages("Indira Gandhi met Nehru in Delhi.", "Indira Gandhi", None, send_image=False)
    config = LLMConfig(model="local", max_tokens=96, timeout_s=300)
    with local_llm_server(parallel=1) as api_base:
        client = LLMClient(config, "generate", None, api_base=api_base, model=f"openai/{LOCAL_MODEL_NAME}",
                           grammar=generation_grammar(3))
        [result] = client.run([LLMRequest("m", messages)], progress=False)
    assert result.ok and result.call["finish_reason"] == "stop", result.call
    parsed = parse_generation(result.text, "Indira Gandhi", max_triples=3)
    assert parsed.entity_type == "person" and parsed.description and 2 <= len(parsed.triples) <= 3, result.text
    assert len(result.text.splitlines()) <= 4  # the head line and at most 3 facts


def test_api_base_is_part_of_the_cache_key(tmp_path):
    fake = FakeLLM()
    install(fake)
    _client(tmp_path, api_base="http://a.invalid/v1").run(_requests(2), progress=False)
    _client(tmp_path, api_base="http://b.invalid/v1").run(_requests(2), progress=False)
    assert fake.calls == 4  # another server is another model: no answer is reused across them


def test_the_same_served_model_hits_the_cache_on_a_new_port(tmp_path):
    """The packaged model's server binds a random port on each start: the cache follows the model file."""
    fake = FakeLLM()
    install(fake)
    packaged = "packaged:model.gguf:0123abcd"
    settings = LLMConfig(model="fake/model", timeout_s=3, retries=0, backoff_s=0.0)
    for port in (41001, 52002):
        client = LLMClient(settings, "generate", tmp_path / "cache", api_base=f"http://127.0.0.1:{port}/v1",
                           served_by=packaged)
        results = client.run(_requests(2), progress=False)
    assert fake.calls == 2 and all(r.call["cached"] for r in results)


def test_a_call_waiting_to_retry_gives_its_concurrency_slot_to_others(tmp_path):
    class FirstCallFails(FakeLLM):
        async def acompletion(self, *args, **kwargs):
            if self.calls == 0:
                self.calls += 1
                self.prompts.append("failed: " + kwargs["messages"][-1]["content"])
                raise litellm.InternalServerError(message="503", llm_provider="fake", model=kwargs["model"])
            return await super().acompletion(*args, **kwargs)

    fake = FirstCallFails()
    install(fake)
    results = _client(tmp_path, concurrency=1, retries=1, backoff_s=0.3).run(_requests(2), progress=False)
    assert all(r.ok for r in results) and results[0].call["attempts"] == 2
    # request 1 ran while request 0 slept before its retry
    assert [p.split("\n")[0] for p in fake.prompts] == ["failed: Sentence: s0", "Sentence: s1", "Sentence: s0"]


def test_a_hang_is_recorded_as_a_timeout_with_a_message(tmp_path):
    install(FakeLLM(timeout_rate=1.0))
    result = _client(tmp_path, retries=0, timeout_s=0.1).run(_requests(1), progress=False)[0]
    assert result.call["status"] == "timeout" and "no answer within timeout_s=0.1 s" in result.call["error"]


def test_the_thread_setting_reaches_the_local_server(tmp_path, monkeypatch):
    import contextlib

    from kgmel_core.llm import local
    from kgmel_core.llm.open import open_llm

    started = {}

    @contextlib.contextmanager
    def fake_server(**settings):
        started.update(settings)
        yield "http://127.0.0.1:1/v1"

    monkeypatch.setattr(local, "local_llm_server", fake_server)
    with open_llm(LLMConfig(model="local", threads=1, concurrency=2), "generate", tmp_path) as (client, images):
        assert client.served_by.startswith("packaged:") and images is False
    assert started == {"parallel": 2, "threads": 1}


class _FakeXllamacpp:
    """Stands in for xllamacpp: records the parameters the server would have started with."""

    def __init__(self):
        import types

        self.started = []
        outer = self

        class CommonParams:
            def __init__(self):
                self.model = types.SimpleNamespace(path=None)
                self.cpuparams = types.SimpleNamespace(n_threads=-1)
                self.cpuparams_batch = types.SimpleNamespace(n_threads=-1)

        class Server:
            def __init__(self, params):
                outer.started.append(params)

        self.CommonParams, self.Server = CommonParams, Server


def _start_fake_server(monkeypatch, **settings):
    import sys

    from kgmel_core.llm import local

    fake = _FakeXllamacpp()
    monkeypatch.setitem(sys.modules, "xllamacpp", fake)
    with local.local_llm_server(model_path=Path("model.gguf"), **settings):
        pass
    [params] = fake.started
    return params


def test_llm_threads_is_what_the_llama_cpp_server_gets(monkeypatch):
    params = _start_fake_server(monkeypatch, parallel=1, threads=3)
    assert params.cpuparams.n_threads == 3 and params.cpuparams_batch.n_threads == 3
    assert params.n_parallel == 1 and params.n_ctx == 4096


def test_without_llm_threads_the_server_takes_the_cores_no_other_job_is_using(monkeypatch):
    import psutil

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda *a, **k: 2)
    monkeypatch.setattr(psutil, "cpu_percent", lambda *a, **k: 52.0)  # one core kept busy by another process
    assert _start_fake_server(monkeypatch, parallel=1).cpuparams.n_threads == 1
    monkeypatch.setattr(psutil, "cpu_percent", lambda *a, **k: 100.0)  # never fewer than one
    assert _start_fake_server(monkeypatch, parallel=1).cpuparams.n_threads == 1
    monkeypatch.setattr(psutil, "cpu_percent", lambda *a, **k: 3.0)
    assert _start_fake_server(monkeypatch, parallel=1).cpuparams.n_threads == 2


def test_the_packaged_model_gets_one_call_at_a_time_unless_told_otherwise():
    assert LLMConfig(model="local").calls_at_once == 1
    assert LLMConfig(model="openai/gpt-4o-mini").calls_at_once == 4
    assert LLMConfig(model="local", concurrency=2).calls_at_once == 2


def test_a_grammar_goes_to_the_server_in_the_request_body_and_keys_the_answer_cache(tmp_path):
    settings = LLMConfig(model="local", timeout_s=3, retries=0)
    plain = LLMClient(settings, "generate", None, api_base="http://127.0.0.1:1/v1", extra_body={"cache_prompt": True})
    held = LLMClient(settings, "generate", None, api_base="http://127.0.0.1:1/v1", extra_body={"cache_prompt": True},
                     grammar='root ::= "yes"')
    kwargs = held._kwargs([{"role": "user", "content": "x"}])
    assert kwargs["extra_body"] == {"cache_prompt": True, "grammar": 'root ::= "yes"'} and "grammar" not in kwargs
    assert "grammar" not in plain._kwargs([{"role": "user", "content": "x"}])["extra_body"]
    messages = [{"role": "user", "content": "x"}]
    assert prompt_hash(plain.model, messages, plain.params) != prompt_hash(held.model, messages, held.params)
