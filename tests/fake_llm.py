"""A fake LiteLLM provider for tests only: scripted answers plus injected latency, timeouts,
5xx errors and garbage, registered as `fake/<anything>` through LiteLLM's custom-provider hook."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable

import litellm
from litellm import CustomLLM


def _prompt(messages) -> str:
    content = messages[-1]["content"]
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def is_generation(prompt: str) -> bool:
    return prompt.startswith("Sentence: ") and "\nMention: " in prompt and "Which candidate" not in prompt


def default_answer(prompt: str) -> str:
    """A plausible model: generation echoes facts from the sentence, rerank picks retrieval's first choice."""
    if is_generation(prompt):
        sentence = re.findall(r"^Sentence: (.*)$", prompt, re.M)[-1]
        mention = re.findall(r"^Mention: (.*)$", prompt, re.M)[-1]
        words = [w.strip(".,") for w in sentence.split() if w[:1].isupper() and w.strip(".,") != mention]
        lines = [f"thing; something named {mention}"]
        lines += [f"related to: {w}" for w in words[:3]] or ["instance of: thing"]
        return "\n".join(lines)
    candidates = re.findall(r"^(Q\d+): ", prompt, re.M)
    if not candidates:
        return "no idea"
    # question_first lists retrieval order; the reference layout ("Candidates:" first) lists it reversed
    return candidates[-1] if prompt.startswith("Candidates:") else candidates[0]


class FakeLLM(CustomLLM):
    def __init__(
        self,
        answer: Callable[[str], str] = default_answer,
        failure_rate: float = 0.0,
        timeout_rate: float = 0.0,
        garbage_rate: float = 0.0,
        latency_s: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        self.answer, self.failure_rate, self.timeout_rate = answer, failure_rate, timeout_rate
        self.garbage_rate, self.latency_s = garbage_rate, latency_s
        self.rng = random.Random(seed)
        self.calls = 0
        self.prompts: list[str] = []  # every prompt that reached the provider

    @property
    def generation_calls(self) -> int:
        return sum(is_generation(p) for p in self.prompts)

    async def acompletion(self, *args, **kwargs) -> litellm.ModelResponse:
        self.calls += 1
        prompt = _prompt(kwargs["messages"])
        self.prompts.append(prompt)
        roll = self.rng.random()
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if roll < self.failure_rate:
            raise litellm.InternalServerError(message="injected 503", llm_provider="fake", model=kwargs["model"])
        if roll < self.failure_rate + self.timeout_rate:
            await asyncio.sleep(3600)
        text = (
            "@@## lorem ipsum ##@@"
            if roll < self.failure_rate + self.timeout_rate + self.garbage_rate
            else self.answer(prompt)
        )
        choice = {"message": {"role": "assistant", "content": text}, "finish_reason": "stop", "index": 0}
        if kwargs.get("optional_params", {}).get("logprobs"):  # the answer's first token, certain of itself
            first = {"token": text.split()[0] if text.split() else "", "logprob": 0.0, "bytes": None}
            choice["logprobs"] = {"content": [{**first, "top_logprobs": [first]}]}
        return litellm.ModelResponse(
            model=kwargs["model"],
            choices=[choice],
            usage={
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(text.split()),
                "total_tokens": len(prompt.split()) + len(text.split()),
            },
        )

    def completion(self, *args, **kwargs):
        return asyncio.run(self.acompletion(*args, **kwargs))


def install(fake: FakeLLM) -> None:
    litellm.custom_provider_map = [{"provider": "fake", "custom_handler": fake}]
    from litellm.utils import custom_llm_setup

    custom_llm_setup()
