"""Arrow schemas of every table the pipeline writes; the single place that defines column types."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

MENTIONS = pa.schema(
    [
        ("mention_id", pa.string()),
        ("sentence_id", pa.string()),
        ("sentence", pa.string()),
        ("mention", pa.string()),
        ("split", pa.string()),
        ("gold_qid", pa.string()),
        ("gold_label", pa.string()),
        ("image_path", pa.string()),  # null: the mention has no image (counted at ingest)
        ("image_sha256", pa.string()),
    ]
)

ENTITIES = pa.schema(
    [
        ("qid", pa.string()),
        ("label", pa.string()),
        ("description", pa.string()),
        ("image_path", pa.string()),
        ("image_sha256", pa.string()),
    ]
)

KB_TRIPLES = pa.schema(
    [
        ("head_qid", pa.string()),
        ("relation", pa.string()),
        ("relation_description", pa.string()),
        ("tail", pa.string()),
        ("tail_description", pa.string()),
    ]
)

# Records `dataset.bad_records: skip` dropped: which file, record (index or line), id, field, and why.
REJECTED = pa.schema(
    [
        ("file", pa.string()),
        ("record", pa.string()),
        ("record_id", pa.string()),
        ("field", pa.string()),
        ("reason", pa.string()),
    ]
)

# Relation labels a Wikidata dump gives its properties (stage `kb`).
PROPERTIES = pa.schema([("pid", pa.string()), ("label", pa.string()), ("description", pa.string())])

MENTION_TRIPLES = pa.schema(
    [
        ("mention_id", pa.string()),
        ("relation", pa.string()),
        ("tail", pa.string()),
        ("call_id", pa.string()),
    ]
)

# One row per mention: what stage 1 produced besides triples (entity type, description, status).
MENTION_GENERATIONS = pa.schema(
    [
        ("mention_id", pa.string()),
        ("entity_type", pa.string()),
        ("description", pa.string()),
        ("n_triples", pa.int32()),
        ("status", pa.string()),  # ok | parse_failed | call_failed
        ("raw_text", pa.string()),
        ("call_id", pa.string()),
    ]
)

LLM_CALLS = pa.schema(
    [
        ("call_id", pa.string()),
        ("stage", pa.string()),
        ("model", pa.string()),
        ("prompt_hash", pa.string()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("latency_s", pa.float64()),
        ("status", pa.string()),  # ok | error | timeout
        ("error", pa.string()),
        ("cached", pa.bool_()),
        ("attempts", pa.int32()),
        ("finish_reason", pa.string()),  # stop | length (cut at max_tokens); null for failed calls
    ]
)


def embedding_field(name: str, dim: int) -> pa.Field:
    return pa.field(name, pa.list_(pa.float32(), dim))


def text_embeddings(dim: int) -> pa.Schema:
    return pa.schema([("text_sha", pa.string()), ("text", pa.string()), embedding_field("vector", dim)])


def image_embeddings(dim: int) -> pa.Schema:
    return pa.schema([("image_sha256", pa.string()), embedding_field("vector", dim)])


def fused_entities(dim: int) -> pa.Schema:
    return pa.schema([("qid", pa.string()), embedding_field("vector", dim)])


def fused_mentions(dim: int) -> pa.Schema:
    return pa.schema([("mention_id", pa.string()), ("split", pa.string()), embedding_field("vector", dim)])


CANDIDATES = pa.schema(
    [("mention_id", pa.string()), ("rank", pa.int32()), ("qid", pa.string()), ("score", pa.float32())]
)

FILTERED_TRIPLES = pa.schema(
    [("mention_id", pa.string()), ("qid", pa.string()), ("relation", pa.string()), ("tail", pa.string())]
)

FILTER_COUNTS = pa.schema([("mention_id", pa.string()), ("triples_before", pa.int64()), ("triples_after", pa.int64())])

PREDICTIONS = pa.schema(
    [
        ("mention_id", pa.string()),
        ("qid", pa.string()),
        ("source", pa.string()),  # llm | reranker | retrieval (confident, not sent) | fallback
        ("reason", pa.string()),  # confident, or why a fallback happened (null for llm)
        ("call_id", pa.string()),
        ("margin", pa.float64()),  # retrieval's top-1 minus top-2 score: what the adaptive gate reads
        ("answer", pa.string()),  # the LLM's raw answer (null when it was not asked or the call failed)
    ]
)

# Stage 3's ranked list (learned reranker): every candidate of a mention in fused-score order.
RERANKED = pa.schema(
    [
        ("mention_id", pa.string()),
        ("rank", pa.int32()),
        ("qid", pa.string()),
        ("score", pa.float64()),  # the fused score the list is ordered by (null: not reranked, retrieval order)
        ("reranker_score", pa.float32()),
        ("retrieval_score", pa.float32()),
        ("retrieval_rank", pa.int32()),
    ]
)

# The trained reranker's score of each val (mention, candidate), kept with the model.
RERANKER_SCORES = pa.schema([("mention_id", pa.string()), ("qid", pa.string()), ("reranker_score", pa.float32())])

# Each val mention's fold and the fusion weights fitted on the other fold (what its reported rank uses).
RERANKER_FOLDS = pa.schema(
    [("mention_id", pa.string()), ("fold", pa.int32()), ("reranker_weight", pa.float64()),
     ("retrieval_weight", pa.float64())]
)

RERANKER_HISTORY = pa.schema(
    [
        ("step", pa.int32()),
        ("epoch", pa.int32()),
        ("train_loss", pa.float64()),
        ("val_hits1", pa.float64()),  # fused HITS@1 on the early-stopping sample of val
    ]
)

TRAINING_HISTORY = pa.schema(
    [
        ("epoch", pa.int32()),
        ("train_loss", pa.float64()),
        ("val_loss", pa.float64()),
        ("val_hits1", pa.float64()),
        ("val_mrr", pa.float64()),
    ]
)

# One dataset's benchmark: every variant's val metrics and training cost, long format.
BENCHMARK = pa.schema(
    [
        ("dataset", pa.string()),
        ("method", pa.string()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)

# HITS@1 if only the mentions with a retrieval margin below `threshold` went to the LLM (evaluate).
GATE_CURVE = pa.schema(
    [("split", pa.string()), ("threshold", pa.float64()), ("sent", pa.float64()), ("hits1", pa.float64())]
)

NIL_OUTCOMES = pa.schema(
    [
        ("mention_id", pa.string()),
        ("is_nil", pa.bool_()),
        ("nil_probability", pa.float64()),
        ("predicted_nil", pa.bool_()),
        ("top1_correct", pa.bool_()),
    ]
)

# The NIL model a served version carries (`kgmel_core.nil.NilModel`): one row.
NIL_MODEL = pa.schema(
    [
        ("features", pa.list_(pa.string())),
        ("mean", pa.list_(pa.float64())),
        ("scale", pa.list_(pa.float64())),
        ("weights", pa.list_(pa.float64())),
        ("bias", pa.float64()),
        ("threshold", pa.float64()),  # on P(NIL): the best NIL F1 on val within nil.max_in_kb_cost
    ]
)

NIL_DECISIONS = pa.schema(
    [
        ("mention_id", pa.string()),
        ("nil_score", pa.float64()),  # P(NIL); null: undecided (its list lacks a value the model reads)
        ("nil", pa.bool_()),  # nil_score at or above the threshold: the answer is "not in the KB"
    ]
)

METRICS = pa.schema(
    [
        ("method", pa.string()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)


def vector_column(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A float32 [n, d] matrix as an Arrow `fixed_size_list<float32>[d]` column (no copy per row)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])


def text_embeddings_table(shas: list[str], texts: list[str], vectors: np.ndarray) -> tuple[pa.Table, pa.Schema]:
    return (pa.table({"text_sha": shas, "text": texts, "vector": vector_column(vectors)}),
            text_embeddings(vectors.shape[1]))


def image_embeddings_table(shas: list[str], vectors: np.ndarray) -> tuple[pa.Table, pa.Schema]:
    """Also for no image at all (`vectors` of shape [0, d]): the table keeps its width, so readers need no case."""
    table = pa.table({"image_sha256": pa.array(shas, pa.string()), "vector": vector_column(vectors)})
    return table, image_embeddings(vectors.shape[1])


def vector_matrix(column: pl.Series) -> np.ndarray:
    """An embedding column (polars Array or List of float32) as a writable float32 [n, d] matrix."""
    if column.len() == 0:
        return np.zeros((0, 0), np.float32)
    return np.array(column.to_numpy(), dtype=np.float32).reshape(column.len(), -1)


# What each stage writes, with a line on each table: docs/artifacts.md is generated from this
# (`python scripts/artifact_docs.py`; a test fails when the page and the schemas disagree). `d` stands for
# the embedding width.
_D = 8
STAGE_TABLES: dict[str, dict[str, tuple[pa.Schema, str]]] = {
    "kb": {
        "entities": (ENTITIES, "items of a Wikidata dump: label and description in the chosen language"),
        "kb_triples": (KB_TRIPLES, "their claims whose value is an item, time, quantity or string"),
        "properties": (PROPERTIES, "the dump's own property labels"),
    },
    "ingest": {
        "mentions": (MENTIONS, "one row per mention; image_path null when it has none (counted)"),
        "entities": (ENTITIES, "the KB"),
        "kb_triples": (KB_TRIPLES, "the KB's triples, relation and tail descriptions where known"),
        "rejected": (REJECTED, "records `dataset.bad_records: skip` dropped, with file, record, field, reason"),
    },
    "generate": {
        "mention_triples": (MENTION_TRIPLES, "stage 1's (relation, tail) pairs per mention"),
        "mention_generations": (MENTION_GENERATIONS, "per mention: type, description, status"),
        "llm_calls": (LLM_CALLS, "every call: model, tokens, latency, status, cached, attempts"),
    },
    "embed": {
        "text_embeddings": (text_embeddings(_D), "every distinct string the retriever reads, once"),
        "image_embeddings": (image_embeddings(_D), "every distinct image, once"),
    },
    "train": {"training_history": (TRAINING_HISTORY, "per epoch (seconds are in the manifest's stats)")},
    "index": {"fused_entities": (fused_entities(_D), "the trained retriever's vector of every KB entity")},
    "retrieve": {
        "fused_mentions": (fused_mentions(_D), "the trained retriever's vector of every mention"),
        "candidates": (CANDIDATES, "the index's top-K per mention"),
    },
    "filter": {
        "filtered_triples": (FILTERED_TRIPLES, "the KB facts stage 3 shows of each (mention, candidate)"),
        "filter_counts": (FILTER_COUNTS, "facts per mention before and after the filter"),
    },
    "train_reranker": {
        "reranker_history": (RERANKER_HISTORY, "per validation of the cross-encoder's training"),
        "reranker_val_scores": (RERANKER_SCORES, "the trained reranker's score of every val candidate"),
        "reranker_folds": (RERANKER_FOLDS, "each val mention's fold and its out-of-fold fusion"),
    },
    "rerank": {
        "predictions": (PREDICTIONS, "one answer per mention and where it came from"),
        "reranked": (RERANKED, "learned reranker: every candidate in fused-score order"),
        "llm_calls": (LLM_CALLS, "LLM method: every call"),
    },
    "evaluate": {
        "metrics": (METRICS, "HITS@k, MRR, counts per method and split"),
        "rerank_gate_curve": (GATE_CURVE, "HITS@1 against the share of mentions sent to stage 3"),
        "nil_outcomes": (NIL_OUTCOMES, "out-of-KB evaluation, per val mention: made NIL?, P(NIL) out of fold, "
                                       "predicted NIL?, top-1 right?"),
    },
    "fit_nil": {"nil_model": (NIL_MODEL, "the NIL model fitted on val with withheld entities, and its threshold")},
    "decide_nil": {"nil_decisions": (NIL_DECISIONS, "per linked mention: P(NIL) and whether it is answered NIL")},
    "benchmark": {"benchmark": (BENCHMARK, "one dataset's variants on val, long format")},
}


def schema_markdown() -> str:
    """The tables of STAGE_TABLES as markdown, one row per table with its columns and Arrow types."""
    lines = ["| stage | table | columns (Arrow types) | what it holds |", "|---|---|---|---|"]
    for stage, tables in STAGE_TABLES.items():
        for name, (schema, note) in tables.items():
            columns = ", ".join(f"{f.name} `{str(f.type).replace(f'[{_D}]', '[d]')}`" for f in schema)
            lines.append(f"| `{stage}` | `{name}` | {columns} | {note} |")
    return "\n".join(lines)
