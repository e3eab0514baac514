"""Typed pipeline configuration, validated before any work starts.

Each stage hashes only its own section into its artifact key, so changing, say, the reranker
model never invalidates trained retrievers or embeddings.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def runtime(default: Any, **constraints: Any) -> Any:
    """A setting that changes how a stage runs (speed, retries, device), never what it writes: it stays
    out of artifact keys (`key_config`), so changing it reuses every artifact."""
    return Field(default, json_schema_extra={"runtime": True}, **constraints)


def _is_runtime(field: Any) -> bool:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return bool(extra.get("runtime"))


def key_config(section: BaseModel) -> dict[str, Any]:
    """The settings of a section that decide what a stage writes: every field not declared `runtime`,
    nested sections likewise."""
    values = section.model_dump()
    for name, field in type(section).model_fields.items():
        if _is_runtime(field):
            del values[name]
        elif isinstance(getattr(section, name), BaseModel):
            values[name] = key_config(getattr(section, name))
    return values


def runtime_values(section: BaseModel) -> dict[str, Any]:
    """The section's own `runtime` settings: what a served model takes from the live config."""
    return {name: getattr(section, name) for name, field in type(section).model_fields.items() if _is_runtime(field)}


class DatasetConfig(_Section):
    path: str = "demo_data"
    name: str = "demo"
    mentions_file: str | None = None
    mention_image_dir: str = "mention_images"
    kb_entities_file: str = "kb/entities.json"
    kb_image_dir: str = "kb/images"
    kb_triples_file: str = "kb/triples.tsv"
    property_labels_file: str = "PID2Label.tsv"
    # A malformed record stops ingest (fail), or is filed in the `rejected` table and counted (skip).
    bad_records: Literal["fail", "skip"] = "fail"
    # A longer sentence is cut to this many characters around its first mention (counted): a 1 MB
    # "sentence" would otherwise cost minutes and a GB in every text stage for what a window carries.
    max_sentence_chars: int = Field(5000, ge=200)
    # A file with more mentions is refused before any row is built (ingest and `kgmel link`): rows, embeddings
    # and candidates all grow with it, and a wrong file is cheaper to name than to embed for hours.
    max_mentions: int = runtime(1_000_000, ge=1)
    # A larger image is counted as no image (named in the stats) instead of being decoded: pixels cost memory
    # three bytes each. The cap is PIL's own decompression-bomb limit, which every later stage still applies.
    max_image_pixels: int = Field(89_478_485, ge=1, le=89_478_485)


class KBConfig(_Section):
    """A KB built from a Wikidata JSON dump (`latest-all.json[.gz|.bz2]`) instead of `kb/` files."""

    dump: str | None = None
    language: str = "en"
    qids_file: str | None = None  # keep exactly these items (one QID per line, or a JSON list)
    min_sitelinks: int = Field(0, ge=0)  # without a QID list: items with a label and at least this many
    partitions: int = Field(1, ge=1)  # byte ranges of an uncompressed dump parsed in parallel


RerankLayout = Literal["question_first", "reference", "numbered"]  # how the LLM method's prompt orders its parts

# `clip_pretrained` value: a tiny open_clip stand-in trained on the dataset itself (offline demos, tests).
TRAIN_ON_DATASET = "train-on-dataset"


class EncoderConfig(_Section):
    """Frozen encoders. `clip_pretrained` is an open_clip tag (`openai`) or a local checkpoint path.

    Text and images may come from different encoders (e.g. MiniLM text + CLIP images); the
    retriever projects each modality to `hidden_dim`, so their dimensions need not match.
    """

    text_encoder: Literal["open_clip", "minilm", "mpnet"] = "open_clip"
    image_encoder: Literal["open_clip", "none"] = "open_clip"
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    batch_size: int = runtime(32, ge=1)  # strings per forward pass, more when short (encoders.length_batches)
    device: str = runtime("auto")
    # The encoders' forward pass under bf16 autocast (vectors normalised in fp32). auto: bf16 where the
    # hardware multiplies it natively (AMX or AVX512-BF16 CPU, bf16 GPU), else fp32. The resolved
    # precision is part of the embed artifact's key and the embedding cache's encoder identity.
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    mention_text: Literal["mention_sentence", "mention_only"] = "mention_sentence"
    entity_text: Literal["label_description", "label"] = "label_description"
    # clip_pretrained=train-on-dataset only: epochs of the tiny stand-in CLIP (its own stage's setting: the
    # encoder stages see it through that stage's artifact).
    bootstrap_epochs: int = runtime(40, ge=1)

    @property
    def bootstraps_clip(self) -> bool:
        """Whether the images (and texts, with `open_clip`) come from a CLIP trained on the dataset."""
        return self.clip_pretrained == TRAIN_ON_DATASET


class RetrieverConfig(_Section):
    # None: the text encoder's width (MiniLM 384, mpnet 768), so the residual start is exactly the zero-shot
    # cosine; a smaller width truncates that identity start (the reference uses 512 with CLIP's 512-d).
    hidden_dim: int | None = Field(None, ge=8)
    dropout: float = Field(0.2, ge=0, lt=1)
    beta: float = Field(0.6, ge=0, le=1)
    attn_temperature: float = Field(0.1, gt=0)
    top_p: int = Field(5, ge=1)
    use_triples: bool = True
    # Feed the VLM's generated triples to the retriever (mention side). Off when generation runs on a
    # subset only (the demo), so training and test mentions look alike.
    use_mention_triples: bool = True
    use_image: bool = True
    use_gate: bool = True
    # The name view: mention surface and entity label embedded alone, fused beside the head texts.
    use_name: bool = True
    max_triples: int = Field(50, ge=1)
    # residual: start at the frozen encoder (identity head path, zero-initialised triple/image outputs),
    # so training adds to the zero-shot cosine; paper: the reference's random initialisation.
    init: Literal["residual", "paper"] = "residual"
    # Softmax over the top-p triples (True), or the reference's full softmax with the rest zeroed (False).
    top_p_renormalize: bool = True


class TrainingConfig(_Section):
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(1024, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    tau_cl: float = Field(0.1, gt=0)
    lambda_mm: float = Field(0.1, ge=0)
    lambda_ee: float = Field(0.1, ge=0)
    patience: int = Field(5, ge=1)  # validations without improvement before stopping
    validate_every: int = Field(1, ge=1)  # epochs between validations (each encodes the whole KB)
    # Extra negatives per mention, drawn each batch from its `hard_negative_pool` nearest entities by the
    # frozen head-text cosine (gold excluded); 0 = in-batch negatives only, as the reference.
    hard_negatives: int = Field(0, ge=0)
    hard_negative_pool: int = Field(16, ge=1)
    seed: int = 0
    device: str = runtime("auto")
    # Training steps under bf16 autocast (fp32 weights and optimizer; validation, encoding and the index
    # stay fp32). auto: bf16 where the hardware multiplies it natively (AMX or AVX512-BF16 CPU, bf16
    # GPU), else fp32. fp32 by default, so the same config gives the same model on every machine; the
    # benchmark configs use auto (its effect on quality: docs/results.md).
    precision: Literal["auto", "fp32", "bf16"] = "fp32"


class IndexConfig(_Section):
    # auto: flat below auto_threshold entities, IVF-PQ above (parameters derived from the KB size)
    kind: Literal["auto", "flat", "ivf", "ivfpq", "ivfsq", "hnsw"] = "auto"
    auto_threshold: int = Field(1_000_000, ge=1)
    nlist: int = Field(0, ge=0)  # 0: derived, ~sqrt(n) (a power of two, at most 4,096)
    nprobe: int = Field(0, ge=0)  # 0: derived, lists holding ~375 sqrt(n) vectors (at least 8)
    pq_m: int = Field(0, ge=0)  # ivfpq sub-quantizers; 0: derived, one per 8 dimensions
    # bits a sub-quantizer code: 4 is FAISS's fast-scan PQ (SIMD look-ups, ~10x faster to scan, coarser:
    # the re-scoring restores the order), 8 the classic PQ
    pq_nbits: Literal[4, 8] = 4
    # ivfsq: bits a dimension of each vector's residual to its list centroid. 4 bits x 768 = 384 bytes, 8x
    # the fast-scan PQ codes and slower to scan, but ranks near-ties (tight clusters) that PQ cannot
    # tell apart; it suits KBs whose neighbours sit in few lists (a small nprobe: set it).
    sq_bits: Literal[4, 6, 8] = 4
    # ivfpq, ivfsq: re-score the first pass's top `rescore` exactly against the full vectors, read from a file of
    # the index artifact (PQ codes alone lose a third of the true top-16). None: derived, 16 x top_k (at
    # least 256); 0: off. Flat, IVF-Flat and HNSW already score with the full vectors.
    rescore: int | None = Field(None, ge=0)
    rescore_dtype: Literal["float16", "float32"] = "float16"  # the vectors on disk (fp16: half the bytes)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(128, ge=1)  # candidates HNSW explores per query; keep it well above top_k
    use_gpu: Literal["auto", "never", "always"] = "auto"
    top_k: int = Field(16, ge=1)
    # reindex-kb appends the entities a KB gained to the served index instead of rebuilding it, while the
    # rows appended since its last full build stay under this share of that build's rows (0: always
    # rebuild) and the new vectors lie no further from their nearest IVF list than `append_max_drift`
    # times the built ones (mean squared distance); changed or removed entities always rebuild.
    append_max_growth: float = Field(0.25, ge=0)
    append_max_drift: float = Field(1.2, ge=1)


class LLMConfig(_Section):
    """Any LiteLLM model string: `openai/gpt-4o-mini`, `ollama/llava`, `openai/<name>` + api_base."""

    model: str = "local"  # "local": the packaged model served by the local OpenAI-compatible server
    api_base: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the key
    temperature: float = 0.0
    max_tokens: int = Field(256, ge=1)
    timeout_s: float = runtime(120, gt=0)
    retries: int = runtime(2, ge=0)
    backoff_s: float = runtime(1.0, ge=0)  # waits backoff_s * 2**attempt between tries
    # Calls in flight at once (None: 4 to a hosted provider, 1 to the packaged model: on 2 cores a second
    # llama.cpp slot costs more than it gives, `bench/llm_local.py`).
    concurrency: int | None = runtime(None, ge=1)
    # CPU threads of the packaged model's llama.cpp server (None: the cores no other job is using when it
    # starts). Oversubscribed llama.cpp threads wait on each other and slow every call many times over.
    threads: int | None = runtime(None, ge=1)
    # Send the image? auto: yes for remote models, no for the packaged local (text-only) model.
    vision: Literal["auto", "yes", "no"] = "auto"
    # A stage whose LLM calls failed (outage, timeouts) is run again by later runs, re-calling only the
    # failures (successes come from the answer cache), until none fail or it ran this many times.
    max_stage_attempts: int = runtime(3, ge=1)

    @property
    def calls_at_once(self) -> int:
        return self.concurrency or (1 if self.model == "local" else 4)


class LLMScope(_Section):
    """Which mentions an LLM stage runs on; the others get a row saying they were skipped (counted)."""

    splits: list[str] | None = None  # None: every split
    max_mentions: int | None = Field(None, ge=1)  # N of the chosen splits: the first by mention_id, or
    sample_seed: int | None = None  # a seeded random sample of N (the same sample for every variant)
    # N of each named split ({train: 1000, val: 300}), in place of `splits` and `max_mentions`: the same
    # first-by-id or seeded choice, made per split, so one split's size never changes another's sample.
    per_split: dict[str, int] | None = None

    @model_validator(mode="after")
    def _one_way_to_size(self) -> LLMScope:
        if self.per_split is not None:
            if self.splits is not None or self.max_mentions is not None:
                raise ValueError("scope: give per_split, or splits/max_mentions, not both")
            if not self.per_split or min(self.per_split.values()) < 1:
                raise ValueError(f"scope.per_split needs at least one split and sizes >= 1, got {self.per_split}")
        return self


class GenerationConfig(_Section):
    enabled: bool = True
    llm: LLMConfig = LLMConfig(max_tokens=96)
    # Facts per mention: each costs ~7 generated tokens; with 5 the packaged model wrote 3-4 (bench/llm_local.py).
    max_triples: int = Field(5, ge=1)
    scope: LLMScope = LLMScope()


class CrossEncoderConfig(_Section):
    """The learned reranker (`rerank.method: cross_encoder`): a packaged sentence encoder fine-tuned as a
    cross-encoder on the train split, the retriever's own top-ranked mistakes as its negatives."""

    base: Literal["minilm", "mpnet"] = "minilm"  # mpnet needs `make mpnet`
    max_length: int = Field(96, ge=16)  # tokens of one (mention, candidate) pair; the cost grows with it
    max_sentence_chars: int = Field(400, ge=20)  # longer sentences keep a window around the mention (counted)
    max_description_chars: int = Field(200, ge=0)  # of a candidate's description in its text
    max_facts: int = Field(6, ge=0)  # the filter's facts per candidate in its text (0: none)
    train_mentions: int = Field(4000, ge=1)  # a seeded sample of the train mentions whose gold was retrieved
    # The share of that sample taken from the mentions whose gold the retriever put least ahead of its best
    # wrong candidate (its mistakes and near-ties); the rest is drawn at random.
    hard_share: float = Field(0.75, ge=0, le=1)
    negatives: int = Field(7, ge=1)  # wrong candidates per training mention, best-ranked first
    epochs: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    batch_mentions: int = Field(8, ge=1)
    val_mentions: int = Field(600, ge=2)  # the seeded val sample early stopping reads
    validate_every: int = Field(250, ge=1)  # training steps between validations (and one at the end)
    patience: int = Field(3, ge=1)  # validations without improvement before stopping
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # resolved on the machine, then part of the key
    device: str = runtime("auto")
    batch_pairs: int = runtime(32, ge=1)  # pairs scored at a time; small batches, two in flight, suit a CPU


class RerankAPIConfig(_Section):
    """A hosted reranker (`rerank.method: api`) through LiteLLM's rerank API: `cohere/<model>` with
    `api_base` for any server that speaks Cohere's /v1/rerank (infinity, TEI-style), `jina_ai/…`, `voyage/…`."""

    model: str = "cohere/rerank-v3.5"
    api_base: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout_s: float = runtime(60, gt=0)
    retries: int = runtime(2, ge=0)
    concurrency: int = runtime(4, ge=1)


class RerankConfig(_Section):
    enabled: bool = True
    # cross_encoder: the learned reranker, fused with the retriever's score (a ranked list);
    # api: a hosted reranker's scores (a ranked list); llm: a chat LLM picks one candidate (the paper's stage 3).
    method: Literal["cross_encoder", "api", "llm"] = "cross_encoder"
    cross_encoder: CrossEncoderConfig = CrossEncoderConfig()  # also how `api` writes mention and candidate texts
    api: RerankAPIConfig = RerankAPIConfig()
    # learned: the reranker's score fused with the retriever's (weights fitted on val); none: its score alone.
    fusion: Literal["learned", "none"] = "learned"
    llm: LLMConfig = LLMConfig(max_tokens=16)
    # The KB facts stage 3 shows of each candidate: filtered (KGMEL's filter against the mention's
    # generated triples; mentions without them fall back to context), context (each candidate's facts
    # most similar to the mention's sentence; needs no stage 1), first (as the KB lists them), none.
    facts: Literal["filtered", "context", "first", "none"] = "filtered"
    filter_n: int = Field(15, ge=1)
    max_triples_per_entity: int = Field(50, ge=0)  # facts per candidate kept by the filter (0: none)
    candidates: int = Field(16, ge=1)
    # Adaptive reranking: rerank only mentions whose retrieval margin (top-1 minus top-2 score) is below
    # this; the rest keep retrieval's ranking. None: rerank every mention, as the paper does. Default: None
    # for the cross-encoder, 0 (ask about none) for the LLM method: on 200-mention val samples the
    # packaged 1.5B model lost HITS@1 against retrieval's top-1 at every share of mentions sent (README).
    # With a stronger LLM, set None or a threshold read off your own `rerank_gate_curve`.
    margin_threshold: float | None = Field(None, ge=0)
    max_description_chars: int = Field(160, ge=10)  # candidate descriptions are cut here in the LLM prompt
    # question_first: sentence and mention, then the candidates in retrieval order (a small model leans towards
    # what it reads first, so the order should agree with retrieval); reference: the candidates first in
    # reverse retrieval order, then the mention (docs/results.md compares them); numbered: as question_first,
    # the candidates numbered 1..K and the answer a number (one token up to K = 9, so its log-probabilities
    # grade every candidate: bench/llm_probabilities.py).
    layout: RerankLayout = "question_first"
    scope: LLMScope = LLMScope()

    @model_validator(mode="after")
    def _llm_asks_none_unless_told(self) -> RerankConfig:
        if self.method == "llm" and "margin_threshold" not in self.model_fields_set:
            self.margin_threshold = 0.0
        return self


class DaskConfig(_Section):
    """`runner: dask`: an existing scheduler (`address`), else a LocalCluster of this shape."""

    address: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    shards: int = Field(0, ge=0)  # shards per parallel step; 0: two per worker


class NilConfig(_Section):
    """Saying "not in the KB" (`kgmel_core.nil`). full-pipeline fits the NIL model on val, where a seeded
    `share` of mentions is made NIL by withholding their gold entities (never an entity that is gold in
    train), evaluates it out of fold, and registers it with the model version; `link` applies the served
    version's model when `enabled`. Off by default: on the benchmarks it costs more than 0.5 HITS@1 on
    in-KB mentions (docs/results.md)."""

    enabled: bool = False
    # P(NIL) at or above which `link` answers NIL; None: the served model's own, chosen on val: the best NIL
    # F1 among the cuts that lose at most `max_in_kb_cost` HITS@1 points on in-KB mentions (None: no bound).
    threshold: float | None = Field(None, ge=0, le=1)
    max_in_kb_cost: float | None = Field(1.0, ge=0, le=100)
    share: float = Field(0.1, gt=0, le=0.5)
    seed: int = 0

    def fitting(self) -> dict[str, Any]:
        """The settings that decide what the NIL model and its evaluation are (their stages' key), not the
        ones that only decide how `link` applies it (`enabled`, `threshold`)."""
        return self.model_dump(include={"share", "seed", "max_in_kb_cost"})


class PipelineConfig(_Section):
    dataset: DatasetConfig = DatasetConfig()
    kb: KBConfig = KBConfig()
    artifacts: str = "artifacts"  # a folder, or an fsspec URL: s3://bucket/prefix, gs://bucket/prefix
    artifacts_options: dict[str, Any] = {}  # fsspec storage options (e.g. client_kwargs: {endpoint_url: ...})
    # local: one process; dask: the flows run on Prefect's DaskTaskRunner and map their parallel steps
    runner: Literal["local", "dask"] = "local"
    dask: DaskConfig = DaskConfig()
    # The name full-pipeline registers its model under, and reindex-kb / link serve (default: dataset.name).
    model_name: str | None = None
    encoder: EncoderConfig = EncoderConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    training: TrainingConfig = TrainingConfig()
    index: IndexConfig = IndexConfig()
    generation: GenerationConfig = GenerationConfig()
    rerank: RerankConfig = RerankConfig()
    nil: NilConfig = NilConfig()
    # Stages rebuilt even when their artifact exists (their outputs get the same key, so the
    # old folder is replaced, and stages after them rebuild only if the content changed).
    force_stages: list[str] = []

    @property
    def model(self) -> str:
        return self.model_name or self.dataset.name

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if self.rerank.candidates > self.index.top_k:
            raise ValueError(f"rerank.candidates ({self.rerank.candidates}) > index.top_k ({self.index.top_k})")
        return self


def explicit_differences(section: BaseModel, trained: dict[str, Any], prefix: str) -> list[str]:
    """Settings a config sets explicitly (in its file or overrides) that differ from what a model was
    trained with; defaults the user never wrote are not a contradiction."""
    return [
        f"{prefix}.{name}: the config says {getattr(section, name)!r}, the model was trained with {trained[name]!r}"
        for name in sorted(section.model_fields_set)
        if name in trained and getattr(section, name) != trained[name]
    ]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Config from a YAML file (optional) with nested overrides applied on top, validated."""
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config file must hold a mapping")
        data = loaded
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        hints = [hint for error in exc.errors() if (hint := _did_you_mean(error["loc"])) is not None]
        if not hints:
            raise
        raise ValueError(f"{exc}\n" + "\n".join(hints)) from None


def _did_you_mean(loc: tuple[Any, ...]) -> str | None:
    """For a misspelt setting (pydantic's "Extra inputs are not permitted"), the settings it may mean."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    if loc[-1] in model.model_fields:
        return None
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=3, cutoff=0.6)
    where = ".".join(map(str, loc[:-1]))
    return f"{'.'.join(map(str, loc))}: no such setting" + (
        f"; did you mean {', '.join(f'{where}.{c}' if where else c for c in close)}?" if close else ""
    )


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw else ""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value
