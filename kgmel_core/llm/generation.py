"""Stage 1's tables: one prompt per in-scope mention, and the answers as `mention_triples` and
`mention_generations`.

Every mention gets a `mention_generations` row, asked or not, so a reader can tell a mention the LLM
was never asked about (`skipped`) from a failed call (`call_failed`, with the error) and from an answer
that did not parse (`parse_failed`, with the raw text kept for inspection).
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from kgmel_core import schemas
from kgmel_core.llm.client import LLMRequest, LLMResult
from kgmel_core.llm.parsing import parse_generation
from kgmel_core.llm.prompts import generation_messages


def generation_requests(mentions: pl.DataFrame, send_images: bool) -> list[LLMRequest]:
    return [
        LLMRequest(
            row["mention_id"],
            generation_messages(row["sentence"], row["mention"], row["image_path"], send_images),
        )
        for row in mentions.iter_rows(named=True)
    ]


def generation_tables(
    mentions: pl.DataFrame, results: Sequence[LLMResult], max_triples: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(`mention_triples`, `mention_generations`) from the answers; `results` may cover only some mentions."""
    triples, generations = [], []
    by_id = {r.key: r for r in results}
    for row in mentions.iter_rows(named=True):
        mention_id = row["mention_id"]
        result = by_id.get(mention_id)
        if result is None:
            generations.append({"mention_id": mention_id, "status": "skipped", "n_triples": 0})
            continue
        call_id = result.call["call_id"]
        if not result.ok:
            generations.append({"mention_id": mention_id, "status": "call_failed", "n_triples": 0,
                                "raw_text": result.call["error"], "call_id": call_id})
            continue
        parsed = parse_generation(result.text, row["mention"], max_triples, truncated=result.truncated)
        triples += [{"mention_id": mention_id, "relation": r, "tail": t, "call_id": call_id} for r, t in parsed.triples]
        generations.append({
            "mention_id": mention_id,
            "entity_type": parsed.entity_type,
            "description": parsed.description,
            "n_triples": len(parsed.triples),
            "status": "ok" if parsed.ok else "parse_failed",
            "raw_text": result.text,
            "call_id": call_id,
        })
    return (
        pl.DataFrame(triples, schema=pl.Schema(schemas.MENTION_TRIPLES)),
        pl.DataFrame(generations, schema=pl.Schema(schemas.MENTION_GENERATIONS)),
    )
