"""Embedding throughput: kgmel's encoders vs. calling open_clip / sentence-transformers directly.

Same batches, same model, same thread count; the difference is kgmel's overhead (tokenising,
batching, normalising, copying to numpy). Weights are random for the CLIP architectures (no
download here): speed does not depend on the weight values.

    python -m bench.embedding_throughput [--texts 2048] [--images 256] [--models kgmel-tiny-clip ViT-B-32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from kgmel_core.retrieval.encoders import MiniLMTextEncoder, OpenClipEncoder
from kgmel_core.retrieval.torch_compat import import_open_clip


def _timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _images(folder: Path, n: int, size: int) -> list[str]:
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (size, size), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(path)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=["kgmel-tiny-clip", "ViT-B-32"])
    args = parser.parse_args()
    texts = [f"Entity number {i}: a sentence about mention {i % 97} and its context" for i in range(args.texts)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _images(Path(tmp), args.images, 224)
        for name in args.models:
            encoder = OpenClipEncoder(name, None, batch_size=args.batch, device="cpu")
            open_clip = import_open_clip()
            tokenizer = open_clip.get_tokenizer(name)

            def direct_texts(encoder=encoder, tokenizer=tokenizer):
                with torch.inference_mode():
                    for s in range(0, len(texts), args.batch):
                        encoder.model.encode_text(tokenizer(texts[s : s + args.batch]), normalize=True)

            def direct_images(encoder=encoder):
                with torch.inference_mode():
                    for s in range(0, len(paths), args.batch):
                        batch = [encoder.preprocess(Image.open(p).convert("RGB")) for p in paths[s : s + args.batch]]
                        encoder.model.encode_image(torch.stack(batch), normalize=True)

            kg_t = _timed(lambda encoder=encoder: encoder.encode_texts(texts, progress=False))
            dir_t = _timed(direct_texts)
            kg_i = _timed(lambda encoder=encoder: encoder.encode_images(paths, progress=False), repeats=1)
            dir_i = _timed(direct_images, repeats=1)
            rows.append((name, len(texts) / kg_t, len(texts) / dir_t, len(paths) / kg_i, len(paths) / dir_i))
        minilm = MiniLMTextEncoder(batch_size=args.batch, device="cpu")
        kg_t = _timed(lambda: minilm.encode_texts(texts, progress=False))
        dir_t = _timed(lambda: minilm.model.encode(texts, batch_size=args.batch, normalize_embeddings=True))
        rows.append(("all-MiniLM-L6-v2", len(texts) / kg_t, len(texts) / dir_t, float("nan"), float("nan")))
    print(f"torch threads: {torch.get_num_threads()}, texts: {len(texts)}, images: {args.images}, batch: {args.batch}")
    print("| model | kgmel strings/s | direct strings/s | kgmel images/s | direct images/s |")
    print("|---|---:|---:|---:|---:|")
    for name, a, b, c, d in rows:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {c:,.1f} | {d:,.1f} |")


if __name__ == "__main__":
    main()
