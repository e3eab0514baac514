"""The exact strings each side is embedded from; one definition shared by every stage."""

from __future__ import annotations

import hashlib


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def with_description(name: str, description: str | None) -> str:
    """`name: description` as the reference encodes relations, tails and entities; bare name if none."""
    return f"{name}: {description}" if description else name


def mention_head_text(mention: str, sentence: str, mode: str = "mention_sentence") -> str:
    """The mention's head text. The reference encodes `mention: <VLM description>`; we encode the
    sentence by default because it is always there, while a description needs the LLM stage."""
    if mode == "mention_only":
        return mention
    return f"{mention}: {sentence}"


def entity_head_text(label: str, description: str | None) -> str:
    return with_description(label, description)
