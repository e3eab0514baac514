"""Models from their config sections, in one place (open_clip's `factory.py` is the model).

What a setting means – which encoder class, which weights – is decided here and nowhere else: the
frozen encoders (`EncoderSpec.of` + `create_encoder`) and the learned reranker (`create_cross_encoder`).
A stage's LLM client opens in `kgmel_core.llm.open.open_llm`, beside the client: a module's code
identity includes everything it imports, so stage 1 must not import the retrieval models. The trained
retriever saves and loads itself beside its class (`KGMELRetriever.save` / `.load`), as nanoGPT keeps
`from_pretrained` with its model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kgmel_core.config import TRAIN_ON_DATASET, CrossEncoderConfig, EncoderConfig
from kgmel_core.rerank.cross_encoder import CrossEncoder
from kgmel_core.retrieval.device import resolve_device, resolved_precision
from kgmel_core.retrieval.encoders import (
    SENTENCE_ENCODERS,
    CompositeEncoder,
    OpenClipEncoder,
    SentenceTransformerTextEncoder,
    composite_identity,
    open_clip_identity,
    sentence_encoder_identity,
)
from kgmel_core.retrieval.tiny_clip import TINY_CLIP_MODEL


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that builds one encoder, resolved: hashable (one encoder per process and spec) and
    picklable (Dask workers build their own)."""

    text_encoder: str
    image_encoder: str
    clip_model: str
    clip_pretrained: str | None
    batch_size: int
    device: str
    precision: str  # fp32 | bf16: `auto` resolved on this machine

    @classmethod
    def of(cls, config: EncoderConfig, bootstrapped_clip: Path | None = None) -> EncoderSpec:
        """`bootstrapped_clip`: the tiny CLIP the `clip_bootstrap` stage trained, which
        `clip_pretrained: train-on-dataset` asks for."""
        clip_model, weights = config.clip_model, config.clip_pretrained
        if config.clip_pretrained == TRAIN_ON_DATASET:
            if bootstrapped_clip is None:
                raise ValueError(f"clip_pretrained={TRAIN_ON_DATASET} needs the clip_bootstrap stage's weights")
            clip_model, weights = TINY_CLIP_MODEL, str(bootstrapped_clip)
        precision = resolved_precision(config.precision, resolve_device(config.device))
        return cls(config.text_encoder, config.image_encoder, clip_model, weights, config.batch_size, config.device,
                   precision)


@functools.cache
def create_encoder(spec: EncoderSpec) -> CompositeEncoder:
    """Texts from `text_encoder`, images from `image_encoder` (one open_clip model serves both when both
    name it); cached, so a process (a Dask worker) loads it once."""
    clip = None
    if "open_clip" in (spec.text_encoder, spec.image_encoder):
        clip = OpenClipEncoder(spec.clip_model, spec.clip_pretrained, batch_size=spec.batch_size, device=spec.device,
                               precision=spec.precision)
    text = clip if spec.text_encoder == "open_clip" else SentenceTransformerTextEncoder(
        spec.text_encoder, batch_size=spec.batch_size, device=spec.device, precision=spec.precision
    )
    return CompositeEncoder(text, clip if spec.image_encoder == "open_clip" else None)


@dataclass(frozen=True)
class EncoderIdentity:
    """The identities `create_encoder(spec)` reports, known without loading a model: the embed stage looks
    vectors up in the cache by them, so a run whose strings are all cached loads no model."""

    text: str
    image: str | None  # None: no image encoder
    shared: bool  # one open_clip model embeds both

    @property
    def encoder(self) -> str:
        return composite_identity(self.text, self.image, self.shared)


def encoder_identity(spec: EncoderSpec) -> EncoderIdentity:
    clip = None
    if "open_clip" in (spec.text_encoder, spec.image_encoder):
        clip = open_clip_identity(spec.clip_model, spec.clip_pretrained, spec.precision)
    text = clip if spec.text_encoder == "open_clip" else sentence_encoder_identity(spec.text_encoder, spec.precision)
    return EncoderIdentity(text, clip if spec.image_encoder == "open_clip" else None,
                           shared=spec.text_encoder == spec.image_encoder == "open_clip")


def encode_texts_with(spec: EncoderSpec, texts: list[str]) -> np.ndarray:
    """Texts through the encoder of `spec`; a plain function of picklable arguments, for workers."""
    return create_encoder(spec).encode_texts(texts, progress=False)


def encode_images_with(spec: EncoderSpec, paths: list[str]) -> np.ndarray:
    return create_encoder(spec).encode_images(paths, progress=False)


def create_cross_encoder(config: CrossEncoderConfig, trained: Path | None = None) -> CrossEncoder:
    """The learned reranker: a trained one from its folder, or (`trained` None) a fresh one on the packaged
    sentence encoder `config.base` with a new scoring head."""
    path = trained if trained is not None else SENTENCE_ENCODERS[config.base]()[0]
    return CrossEncoder(path, config.max_length, config.device, config.precision)
