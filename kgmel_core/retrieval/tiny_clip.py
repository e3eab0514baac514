"""Train a tiny open_clip model on a dataset's own (text, image) pairs, for offline demos and tests.

No pretrained CLIP ships in a PyPI package and nothing may be downloaded here, so the demo and
the tests train `kgmel-tiny-clip` (a 2-layer ViT/text transformer, 64-d) with open_clip's own
`ClipLoss`, save it as a checkpoint file, and load it back through `OpenClipEncoder` exactly as a
real checkpoint (`ViT-B-32` + a .pt path) would be loaded. It is a stand-in encoder, labelled as
such in manifests; its numbers say nothing about CLIP ViT-B/32.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from kgmel_core.retrieval.encoders import open_clip_with_kgmel_configs
from kgmel_core.retrieval.training import seed_everything

TINY_CLIP_MODEL = "kgmel-tiny-clip"


def train_tiny_clip(
    texts: Sequence[str],
    image_paths: Sequence[str],
    out_path: Path,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the tiny CLIP on aligned (text, image) pairs and save a checkpoint open_clip can load."""
    if len(texts) != len(image_paths) or not texts:
        raise ValueError(f"need equal, non-zero numbers of texts and images, got {len(texts)} and {len(image_paths)}")
    open_clip = open_clip_with_kgmel_configs()
    seed_everything(seed)
    root = logging.getLogger()
    quiet = _DropMessage("No pretrained weights loaded")  # random init is the point here, not a problem
    root.addFilter(quiet)
    try:
        model, preprocess_train, _ = open_clip.create_model_and_transforms(
            TINY_CLIP_MODEL, pretrained=None, output_dict=True
        )
    finally:
        root.removeFilter(quiet)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_MODEL)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    pixels = [_load(p) for p in image_paths]
    tokens = tokenizer(list(texts))
    order = list(range(len(texts)))
    rng = random.Random(seed)
    model.train()
    last = float("nan")
    for _ in tqdm(range(epochs), desc="train tiny CLIP", unit="epoch"):
        rng.shuffle(order)
        total, batches = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            images = torch.stack([preprocess_train(pixels[i]) for i in idx])
            out = model(images, tokens[idx])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
        last = total / max(batches, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, out_path)
    return {"final_loss": last, "pairs": len(texts), "epochs": epochs}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _load(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
