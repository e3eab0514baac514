"""What stage 1's generated triples are worth, measured on the mentions they were generated for: HITS@1
with paired 95% intervals on the same val mentions.

1. The retriever trained and queried with generated mention triples (the one the reranker was trained on)
   against one without stage 1 (`--without-triples`, a retrieve artifact of a run without), top-1 each.
2. The learned reranker of the run with generation (`--reranker`, a train_reranker artifact) scoring the
   same candidate lists with the facts chosen in different ways: KGMEL's filter against the generated
   triples at several filter n, the generation-free filter (each candidate's facts most like the
   sentence), the KB's first facts, none; and once without the generated description and triples in
   the mention's text. Each is fused with the retriever's score by the reranker's out-of-fold weights,
   exactly as the rerank stage ranks val mentions, so only the facts (or the mention text) differ.

The sample is the val mentions the `generate` artifact of the reranker's lineage asked about (status ok).
One reranker serves every facts variant: it was trained with one filter setting (named in its `filter`
artifact), so a variant it was not trained with is measured as a swap at inference, and the table says so.

    python -m bench.stage1_ablation --artifacts ROOT --reranker TRAIN_RERANKER_KEY --without-triples RETRIEVE_KEY \
        [--filter-n 5 10 15 30] [--split val]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from kgmel_core.config import CrossEncoderConfig, RerankConfig
from kgmel_core.data.texts import HeadTexts
from kgmel_core.factory import create_cross_encoder
from kgmel_core.metrics import paired_gain
from kgmel_core.rerank.candidates import candidate_lists
from kgmel_core.rerank.filtering import TextVectors, filter_mentions
from kgmel_core.rerank.fusion import Fusion
from kgmel_core.rerank.groups import Stage3Tables
from kgmel_core.retrieval.features import mention_heads
from storage import Artifact, ArtifactStore


@dataclass(frozen=True)
class FactsVariant:
    label: str
    facts: str  # rerank.facts: filtered | context | first | none
    n: int
    generation_in_text: bool = True  # the generated description and triples in the mention's text


def facts_variants(filter_ns: Sequence[int], trained_n: int) -> list[FactsVariant]:
    variants = [FactsVariant(f"filtered against generated triples, n = {n}", "filtered", n) for n in filter_ns]
    return variants + [
        FactsVariant("generation-free filter (facts most like the sentence)", "context", trained_n),
        FactsVariant("first KB facts", "first", trained_n),
        FactsVariant("no KB facts", "none", trained_n),
        FactsVariant(f"filtered, n = {trained_n}, mention text without generation", "filtered", trained_n, False),
    ]


def sample(store: ArtifactStore, generation: Artifact, split: str) -> pl.DataFrame:
    """The `split` mentions stage 1 answered for, in mention_id order."""
    asked = generation.read("mention_generations").filter(pl.col("status") == "ok").select("mention_id")
    mentions = store.input(generation, "ingest").read("mentions")
    return mentions.filter(pl.col("split") == split).join(asked, on="mention_id").sort("mention_id")


def top1_hits(retrieve: Artifact, mentions: pl.DataFrame) -> np.ndarray:
    top = retrieve.read("candidates").filter(pl.col("rank") == 1).select("mention_id", top="qid")
    joined = mentions.select("mention_id", "gold_qid").join(top, on="mention_id", how="left", maintain_order="left")
    return (joined["top"] == joined["gold_qid"]).fill_null(False).to_numpy()


class RerankerBench:
    """One trained reranker scoring one sample's candidate lists with the facts of each variant."""

    def __init__(self, store: ArtifactStore, reranker: Artifact, mentions: pl.DataFrame):
        self.store, self.mentions = store, mentions
        self.filtered = store.input(reranker, "filter")
        self.trained_filter = self.filtered.manifest["config"]
        self.ingest = store.input(reranker, "ingest")
        self.retrieve = store.input(reranker, "retrieve")
        self.generation = store.input(reranker, "generation")  # stage 1 ran: what the variants ablate
        self.embed = store.input(self.filtered, "embed")
        trained = reranker.manifest["config"]
        self.config = RerankConfig(cross_encoder=CrossEncoderConfig.model_validate(trained["cross_encoder"]),
                                   candidates=trained["candidates"])
        self.model = create_cross_encoder(self.config.cross_encoder, trained=reranker.folder("reranker"))
        overall = Fusion(**reranker.manifest["stats"]["fusion"])
        folds = {m: Fusion(a, b) for m, _, a, b in reranker.read("reranker_folds").iter_rows()}
        self.fusions = {m: folds.get(m, overall) for m in mentions["mention_id"]}
        self.candidates = self.retrieve.read("candidates")
        self.vectors = TextVectors([self.embed.read("text_embeddings")])
        self.contexts = mention_heads(mentions, HeadTexts.of(self.embed.manifest["config"]))

    def facts(self, variant: FactsVariant) -> tuple[pl.DataFrame, int]:
        """(the facts the filter keeps under `variant`, mentions that fell back to their context)."""
        result = filter_mentions(
            self.mentions, candidate_lists(self.candidates, self.config.candidates), self.ingest.read("kb_triples"),
            self.generation.read("mention_triples"), self.vectors, self.contexts, variant.facts, variant.n,
            self.trained_filter["max_triples_per_entity"],
        )
        return result.kept, result.by_context

    def hits(self, variant: FactsVariant) -> tuple[np.ndarray, int]:
        kept, by_context = self.facts(variant)
        generated = variant.generation_in_text
        tables = Stage3Tables(
            self.mentions, self.candidates, self.ingest.read("entities"), kept,
            self.generation.read("mention_generations") if generated else None,
            self.generation.read("mention_triples") if generated else None,
        )
        groups, _ = tables.groups(self.config)
        scores = self.model.score(groups, self.config.cross_encoder.batch_pairs, progress=True)
        fused = {g.mention_id: self.fusions[g.mention_id].apply(s, g.retrieval_scores)
                 for g, s in zip(groups, scores, strict=True)}
        right = {g.mention_id for g in groups if g.gold is not None and int(np.argmax(fused[g.mention_id])) == g.gold}
        return np.array([m in right for m in self.mentions["mention_id"]]), by_context


@dataclass
class Ablation:
    split: str
    mentions: pl.DataFrame  # the sample
    trained_filter: dict  # the filter settings the reranker learned with
    retriever_with: np.ndarray  # top-1 hits per sample mention
    retriever_without: np.ndarray
    reranked: dict[FactsVariant, tuple[np.ndarray, int]]  # hits, mentions that fell back to their context

    def markdown(self) -> str:
        context = next(hits for v, (hits, _) in self.reranked.items() if v.facts == "context")
        trained = self.trained_filter
        lines = [
            f"{self.split} mentions stage 1 answered: n = {self.mentions.height}; the reranker was trained with "
            f"facts = {trained['facts']}, filter n = {trained['filter_n']}",
            "",
            "| retriever | HITS@1 | with − without, paired 95% |", "|---|---:|---:|",
            _row("with generated mention triples", self.retriever_with, self.retriever_without),
            f"| without stage 1 | {100 * self.retriever_without.mean():.2f} | |",
            "",
            "| + reranker, facts | HITS@1 | vs retriever top-1 | vs generation-free filter | fell back to context |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [_row(v.label, hits, self.retriever_with, context) + f" {by_context} |"
                  for v, (hits, by_context) in self.reranked.items()]
        return "\n".join(lines)


def _row(label: str, hits: np.ndarray, *baselines: np.ndarray) -> str:
    cells = [f"{100 * hits.mean():.2f}"] + ["{:+.2f} ± {:.2f}".format(*paired_gain(hits, b)) for b in baselines]
    return f"| {label} | " + " | ".join(cells) + " |"


def ablation(store: ArtifactStore, reranker: Artifact, without_triples: Artifact, filter_ns: Sequence[int],
             split: str = "val") -> Ablation:
    """The retriever and reranker rows on the sample of the reranker's own stage-1 run."""
    if "generation" not in reranker.manifest["inputs"]:
        raise ValueError(f"reranker {reranker.key} comes from a run without stage 1: nothing to ablate")
    mentions = sample(store, store.input(reranker, "generation"), split)
    bench = RerankerBench(store, reranker, mentions)
    trained_n = bench.trained_filter["filter_n"]
    reranked = {v: bench.hits(v) for v in facts_variants(filter_ns, trained_n)}
    return Ablation(split, mentions, bench.trained_filter, top1_hits(bench.retrieve, mentions),
                    top1_hits(without_triples, mentions), reranked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--reranker", required=True, help="train_reranker key of a run with stage 1")
    parser.add_argument("--without-triples", required=True, help="retrieve key of a run without stage 1")
    parser.add_argument("--filter-n", type=int, nargs="+", default=[5, 10, 15, 30])
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    store = ArtifactStore(args.artifacts)
    reranker = store.require("train_reranker", args.reranker)
    without = store.require("retrieve", args.without_triples)
    print(ablation(store, reranker, without, args.filter_n, args.split).markdown())


if __name__ == "__main__":
    main()
