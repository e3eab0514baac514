"""Retriever training cost on a real dataset: seconds per epoch (training + validation on the whole KB).

Runs the dataset's `ingest` and `embed` stages (cache hits after the first run), then trains a few
epochs of each variant and reports the median epoch time. Run it on an idle machine:

    python -m bench.train_speed --config configs/wikimel.yaml [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kgmel_core.config import load_config
from kgmel_core.data.texts import HeadTexts
from kgmel_core.retrieval.features import subset_side
from kgmel_core.retrieval.model import KGMELRetriever
from kgmel_core.retrieval.training import seed_everything, train_retriever
from kgmel_core.variants import variants_for
from storage import ArtifactStore, RunLog
from tasks import embed as embed_tasks
from tasks import ingest as ingest_tasks
from tasks.common import PipelineContext
from tasks.inputs import load_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    base = load_config(args.config)
    store = ArtifactStore(base.artifacts)
    ctx = PipelineContext(store, RunLog(store, f"bench-{time.time_ns()}", "bench"))
    ingest = ingest_tasks.ingest.fn(ctx, base.dataset)
    embed = embed_tasks.embed.fn(ctx, base.encoder, ingest)
    features = load_features(ingest, embed, None, HeadTexts.of(base.encoder.model_dump()), base.retriever.max_triples)
    split, gold = features.mention_split, features.mention_gold_rows
    train = torch.tensor([i for i, s in enumerate(split) if s == "train"])
    train = train[gold[train] >= 0]
    val = torch.tensor([i for i, s in enumerate(split) if s == "val"])
    triples = int(features.entities.triple_mask.sum())
    width = features.entities.triple_mask.shape[1]
    print(f"{base.dataset.name}: {len(train)} train / {len(val)} val mentions, {len(features.entities)} entities, "
          f"{triples} triples ({len(features.entities.pairs)} distinct pairs; padded width {width}), "
          f"{torch.get_num_threads()} torch threads\n")
    print("| variant | precision | s / epoch (mean) | epochs |")
    print("|---|---|---:|---:|")
    for label, variant in variants_for("speed").items():  # the benchmark configs train with `precision: auto`
        config = variant.config(load_config(args.config, {"training": {"epochs": args.epochs,
                                                                       "patience": args.epochs}}))
        seed_everything(0)
        model = KGMELRetriever(features.banks.text_dim, features.banks.image_dim, config.retriever)
        result = train_retriever(
            model, features.banks, subset_side(features.mentions, train), gold[train], features.entities,
            subset_side(features.mentions, val), gold[val], config.training,
        )
        seconds = [row["seconds"] for row in result.history]
        print(f"| {label} | {result.precision} | {statistics.mean(seconds):.2f} | {len(seconds)} |", flush=True)


if __name__ == "__main__":
    main()
