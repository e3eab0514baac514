"""The exact strings each side is embedded from; one definition shared by every stage."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kgmel_core.config import EncoderConfig


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def window_start(length: int, centre: int, max_chars: int) -> int:
    """Where a `max_chars` window of a `length`-character text starts so that position `centre` is as
    near its middle as the text allows: a long sentence is cut to the words around its mention."""
    return min(max(0, centre - max_chars // 2), max(0, length - max_chars))


def with_description(name: str, description: str | None) -> str:
    """`name: description` as the reference encodes relations, tails and entities; bare name if none."""
    return f"{name}: {description}" if description else name


@dataclass(frozen=True)
class HeadTexts:
    """How each side's head text is written; part of a model's identity (its train manifest).

    mention: `mention_sentence` ("mention: sentence"; the default, always available),
             `mention_only`.
    entity:  `label_description` ("label: description", what the reference encodes), `label`.
    The reference encodes the mention as `mention: <VLM description>`.
    """

    mention: str = EncoderConfig.model_fields["mention_text"].default  # the settings' defaults, declared there
    entity: str = EncoderConfig.model_fields["entity_text"].default

    @classmethod
    def of(cls, encoder: Mapping[str, Any]) -> HeadTexts:
        """From an encoder config (a manifest's `config.encoder` or `EncoderConfig.model_dump()`)."""
        return cls(encoder.get("mention_text", cls.mention), encoder.get("entity_text", cls.entity))

    def mention_text(self, mention: str, sentence: str) -> str:
        return mention if self.mention == "mention_only" else f"{mention}: {sentence}"

    def entity_text(self, label: str, description: str | None) -> str:
        return label if self.entity == "label" else with_description(label, description)
