"""The named configurations the project compares: one registry for the ablation study, the benchmark
and the training-speed bench. A variant is the pipeline config plus overrides; `stage` says which
part it changes (the retriever, trained anew, or stage 3, on the default retriever's candidates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kgmel_core.config import PipelineConfig, deep_merge


@dataclass(frozen=True)
class Variant:
    overrides: dict[str, Any]
    uses: frozenset[str]  # which comparisons list it: ablations, benchmark, retriever-study, reranker-facts, speed
    stage: Literal["retriever", "reranker"] = "retriever"
    needs: frozenset[str] = field(default_factory=frozenset)  # what the data must hold: triples, descriptions, images

    def config(self, base: PipelineConfig) -> PipelineConfig:
        return PipelineConfig.model_validate(deep_merge(base.model_dump(), self.overrides))


def _uses(*names: str) -> frozenset[str]:
    return frozenset(names)


LABEL_ONLY = {"encoder": {"entity_text": "label"}}
VARIANTS: dict[str, Variant] = {
    "kgmel": Variant({}, _uses("ablations", "benchmark")),
    "kgmel w/o triples": Variant({"retriever": {"use_triples": False}}, _uses("ablations", "benchmark"),
                                 needs=frozenset({"triples"})),
    "kgmel w/o image": Variant({"retriever": {"use_image": False}}, _uses("ablations"), needs=frozenset({"images"})),
    "kgmel w/o gate": Variant({"retriever": {"use_gate": False}}, _uses("ablations")),  # no images: it gates nothing
    # The retriever's design study: opt-in (`kgmel benchmark --variant`), so `make benchmark` stays under an hour.
    "kgmel w/o names": Variant({"retriever": {"use_name": False}}, _uses("retriever-study")),
    "kgmel, paper architecture": Variant(  # no name view, random init, reference top-p, the paper's lr
        {"retriever": {"init": "paper", "use_name": False, "top_p_renormalize": False},
         "training": {"lr": 1e-3, "hard_negatives": 0}},
        _uses("retriever-study"),
    ),
    "kgmel, label-only entities": Variant(LABEL_ONLY, _uses("retriever-study"), needs=frozenset({"descriptions"})),
    "kgmel w/o triples, label-only entities": Variant(
        deep_merge(LABEL_ONLY, {"retriever": {"use_triples": False}}), _uses("retriever-study"),
        needs=frozenset({"triples", "descriptions"}),
    ),
    "kgmel + reranker": Variant({"rerank": {"enabled": True, "method": "cross_encoder"}}, _uses("benchmark"),
                                stage="reranker"),
    "kgmel + reranker w/o fusion": Variant(
        {"rerank": {"enabled": True, "method": "cross_encoder", "fusion": "none"}}, _uses("benchmark"),
        stage="reranker",
    ),
    "kgmel + reranker w/o KB facts": Variant(  # candidates as label + description, as a KB without triples
        {"rerank": {"enabled": True, "method": "cross_encoder", "facts": "none",
                    "cross_encoder": {"max_description_chars": 200}}},
        _uses("reranker-facts"), stage="reranker", needs=frozenset({"triples"}),
    ),
    "kgmel + reranker, first KB facts": Variant(
        {"rerank": {"enabled": True, "method": "cross_encoder", "facts": "first"}}, _uses("reranker-facts"),
        stage="reranker", needs=frozenset({"triples"}),
    ),
    # Training cost only (bench.train_speed): the benchmark configs train with `precision: auto`.
    "with triples, fp32": Variant({"training": {"precision": "fp32"}}, _uses("speed")),
    "with triples, bf16 autocast where native (precision auto)": Variant({"training": {"precision": "auto"}},
                                                                         _uses("speed")),
    "with triples, validate every 2 epochs": Variant({"training": {"validate_every": 2}}, _uses("speed")),
    "w/o triples": Variant({"retriever": {"use_triples": False}}, _uses("speed")),
    "with triples, 2 hard negatives": Variant({"training": {"hard_negatives": 2}}, _uses("speed")),
}


def variants_for(use: str) -> dict[str, Variant]:
    return {label: v for label, v in VARIANTS.items() if use in v.uses}


def missing(variant: Variant, has: set[str]) -> str | None:
    """Why a variant would repeat another on this data (what it ablates is absent), or None."""
    lacking = sorted(variant.needs - has)
    return f"the data has no {' or '.join(lacking)}" if lacking else None
