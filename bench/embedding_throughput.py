"""Embedding throughput: kgmel's encoders vs. calling open_clip / sentence-transformers directly.

Same batches, same model, same thread count; the difference is kgmel's overhead (tokenising,
batching, normalising, copying to numpy). Weights are random for the CLIP architectures (no
download here): speed does not depend on the weight values.

`--strings-from wikimel` times the text encoders on a seeded sample of the strings the embed stage
really encodes for that shared dataset (sentences, descriptions, names, triple texts), whose lengths
decide the cost far more than the model overhead does.

    python -m bench.embedding_throughput [--texts 2048] [--images 256] [--models kgmel-tiny-clip ViT-B-32]
        [--text-encoders minilm mpnet] [--strings-from wikimel|richpediamel|wikidiverse] [--precisions fp32 bf16]
        [--batch 16 32 64 256]

`--batch` times every model at each batch size, side by side (`encoder.batch_size` chooses it in the pipeline).

`--precisions` times each text encoder per `encoder.precision` (bf16: the forward pass under bf16
autocast, worth it only where the CPU has AMX tiles or AVX512-BF16, or the GPU bf16) and prints the cosine of each
precision's vectors to the first one's.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kgmel_core.config import EncoderConfig
from kgmel_core.packaged import PackagedModelError
from kgmel_core.retrieval.device import autocast
from kgmel_core.retrieval.encoders import OpenClipEncoder, SentenceTransformerTextEncoder
from kgmel_core.retrieval.torch_compat import import_open_clip


def _timed(fn, repeats: int = 2, warmed: bool = False) -> float:
    """Best of `repeats` timed calls, after one untimed warm-up call unless the caller just made it."""
    if not warmed:
        fn()
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


def _dataset_strings(name: str, n: int, seed: int = 0) -> list[str]:
    """A seeded sample of the distinct strings the embed stage encodes for a shared dataset."""
    from kgmel_core.config import load_config
    from kgmel_core.data.datasets import DatasetLayout, read_dataset
    from kgmel_core.data.texts import HeadTexts
    from kgmel_core.retrieval.features import texts_to_embed

    config = load_config(Path("configs") / f"{name}.yaml")
    data = read_dataset(DatasetLayout.of(config.dataset), bad_records=config.dataset.bad_records)
    strings = texts_to_embed(data.mentions, data.entities, data.kb_triples, HeadTexts.of(config.encoder.model_dump()))
    return random.Random(seed).sample(strings, min(n, len(strings)))


def _time_models(args: argparse.Namespace, batch: int, texts: list[str], paths: list[Path], rows: list,
                 agreement: list[str]) -> None:
    """One row per model (and text encoder precision) at one batch size."""
    for name in args.models:
        encoder = OpenClipEncoder(name, None, batch_size=batch, device="cpu")
        open_clip = import_open_clip()
        tokenizer = open_clip.get_tokenizer(name)

        def direct_texts(encoder=encoder, tokenizer=tokenizer):
            with torch.inference_mode():
                for s in range(0, len(texts), batch):
                    encoder.model.encode_text(tokenizer(texts[s : s + batch]), normalize=True)

        def direct_images(encoder=encoder):
            with torch.inference_mode():
                for s in range(0, len(paths), batch):
                    pixels = [encoder.preprocess(Image.open(p).convert("RGB")) for p in paths[s : s + batch]]
                    encoder.model.encode_image(torch.stack(pixels), normalize=True)

        kg_t = _timed(lambda encoder=encoder: encoder.encode_texts(texts, progress=False))
        dir_t = _timed(direct_texts)
        kg_i = _timed(lambda encoder=encoder: encoder.encode_images(paths, progress=False), repeats=1)
        dir_i = _timed(direct_images, repeats=1)
        rows.append((f"{name} (batch {batch})", len(texts) / kg_t, len(texts) / dir_t, len(paths) / kg_i,
                     len(paths) / dir_i))
    for name in args.text_encoders:
        reference = None
        for precision in args.precisions:
            try:
                encoder = SentenceTransformerTextEncoder(name, batch_size=batch, device="cpu",
                                                         precision=precision)
            except PackagedModelError as exc:
                print(f"skipped {name}: {exc}")
                break

            def direct(encoder=encoder, precision=precision):
                with autocast(precision, "cpu"):
                    encoder.model.encode(texts, batch_size=batch, normalize_embeddings=True)

            vectors = encoder.encode_texts(texts, progress=False)  # the warm-up; kept for the cosine below
            kg_t = _timed(lambda encoder=encoder: encoder.encode_texts(texts, progress=False), warmed=True)
            dir_t = _timed(direct)
            label = f"{encoder.identity.split(':')[1]} {precision} (batch {batch})"
            rows.append((label, len(texts) / kg_t, len(texts) / dir_t, float("nan"), float("nan")))
            if reference is None:
                reference = (precision, vectors)
            else:
                cosines = (vectors * reference[1]).sum(axis=1)
                agreement.append(f"{name} {precision} vs {reference[0]}: cosine min {cosines.min():.5f}, "
                                 f"median {float(np.median(cosines)):.5f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[EncoderConfig().batch_size],
                        help="batch sizes, timed side by side (default: the pipeline's encoder.batch_size)")
    parser.add_argument("--models", nargs="*", default=["kgmel-tiny-clip", "ViT-B-32"])
    parser.add_argument("--text-encoders", nargs="+", default=["minilm"], help="packaged sentence encoders")
    parser.add_argument("--strings-from", help="a shared dataset (configs/<name>.yaml): time its real strings")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="encoder.precision of the text encoders")
    args = parser.parse_args()
    if args.strings_from:
        texts = _dataset_strings(args.strings_from, args.texts)
    else:
        texts = [f"Entity number {i}: a sentence about mention {i % 97} and its context" for i in range(args.texts)]
    rows, agreement = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _images(Path(tmp), args.images, 224)
        for batch in args.batch:
            _time_models(args, batch, texts, paths, rows, agreement)
    mean_chars = sum(map(len, texts)) / len(texts)
    print(f"torch threads: {torch.get_num_threads()}, texts: {len(texts)} ({args.strings_from or 'synthetic'}, "
          f"mean {mean_chars:.0f} chars), images: {args.images}, batches: {args.batch}")
    print("| model | kgmel strings/s | direct strings/s | kgmel images/s | direct images/s |")
    print("|---|---:|---:|---:|---:|")
    for name, a, b, c, d in rows:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {c:,.1f} | {d:,.1f} |")
    for line in agreement:
        print(line)


if __name__ == "__main__":
    main()
