"""Growing a built index with the entities a KB gained, instead of rebuilding it.

An IVF index's lists are k-means centroids of the KB it was trained on; an entity added later is
filed under the nearest of them. That serves as well as a rebuild while the new entities are few and
look like the old ones (`bench.index_scale grow`). `decide` appends while both hold and rebuilds
otherwise, and the index manifest records which it did and why: a KB that changed or lost entities,
a size that now calls for another index plan, more growth since the last full build than
`index.append_max_growth`, or new vectors further from their nearest list than `index.append_max_drift`
times the built ones are.

Which entities are new is decided on the KB rows, never on fused vectors: an entity whose label,
description, image and triples (in order) are unchanged is fused into the same vector by the same
retriever, so its row in the previous index stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from kgmel_core.retrieval.index import IndexPlan

_FIELD, _RECORD = "\x1f", "\x1e"  # separators no KB text holds (ASCII unit/record separators)
_NULL = "\x00"  # a null field, distinct from an empty one


@dataclass(frozen=True)
class KBChanges:
    """How the KB an index was built from differs from the current one."""

    added: list[str]  # qids new to the KB, in the current KB's order
    changed: int  # entities whose label, description, image or triples differ
    removed: int


def entity_signatures(entities: pl.DataFrame, kb_triples: pl.DataFrame) -> pl.DataFrame:
    """(qid, signature): everything the retriever reads about an entity, as one string."""
    fields = [pl.col(c).cast(pl.String).fill_null(_NULL) for c in ("relation", "relation_description", "tail",
                                                                   "tail_description")]
    triples = kb_triples.group_by("head_qid", maintain_order=True).agg(
        triples=pl.concat_str(fields, separator=_FIELD).str.join(_RECORD)
    )
    own = [pl.col(c).cast(pl.String).fill_null(_NULL) for c in ("label", "description", "image_sha256")]
    return (
        entities.join(triples, left_on="qid", right_on="head_qid", how="left", maintain_order="left")
        .select("qid", signature=pl.concat_str([*own, pl.col("triples").fill_null("")], separator=_FIELD))
    )


def kb_changes(before: pl.DataFrame, after: pl.DataFrame) -> KBChanges:
    """Compare two `entity_signatures` tables."""
    joined = after.join(before, on="qid", how="left", suffix="_before", maintain_order="left")
    added = joined.filter(pl.col("signature_before").is_null())["qid"].to_list()
    kept = joined.filter(pl.col("signature_before").is_not_null())
    changed = kept.filter(pl.col("signature") != pl.col("signature_before"))
    removed = before.height - (after.height - len(added))
    return KBChanges(added, changed.height, removed)


@dataclass(frozen=True)
class GrowthRule:
    max_growth: float  # rows appended since the last full build, as a share of that build's rows
    max_drift: float  # new rows' mean squared distance to their nearest list centroid, over the built rows'


@dataclass(frozen=True)
class Decision:
    append: bool
    reason: str


def decide(
    built: IndexPlan,
    wanted: IndexPlan,
    changes: KBChanges,
    built_rows: int,
    appended_before: int,
    rule: GrowthRule,
    drift: float | None = None,
) -> Decision:
    """Append the new entities to the previous index, or rebuild? `drift` (None: not measured yet) is
    the new rows' coarse distance over the built rows'; the other reasons are checked without it."""
    if changes.changed or changes.removed:
        return Decision(False, f"{changes.changed} entities changed and {changes.removed} removed: "
                               "an index only grows in place")
    if replace(built, train_size=0) != replace(wanted, train_size=0):  # the sample size follows n
        return Decision(False, f"the KB's size now calls for another index ({_plan(built)} -> {_plan(wanted)})")
    growth = (appended_before + len(changes.added)) / max(built_rows, 1)
    if growth > rule.max_growth:
        return Decision(False, f"{appended_before + len(changes.added)} rows appended since the last build of "
                               f"{built_rows}: {growth:.1%} > index.append_max_growth {rule.max_growth:.0%}")
    if drift is not None and drift > rule.max_drift:
        return Decision(False, f"new entities are {drift:.2f}x as far from their lists as the built ones "
                               f"(> index.append_max_drift {rule.max_drift})")
    return Decision(True, f"{len(changes.added)} new entities appended ({growth:.1%} growth since the last build"
                          + (f", drift {drift:.2f}x)" if drift is not None else ")"))


def _plan(plan: IndexPlan) -> str:
    return plan.kind if not plan.nlist else f"{plan.kind} nlist={plan.nlist} nprobe={plan.nprobe}"


def coarse_distance(centroids: np.ndarray, vectors: np.ndarray, block: int = 4096) -> float:
    """Mean squared L2 distance of each vector to its nearest centroid: the k-means objective the lists
    were trained to minimise, so new vectors it fits worse are filed under lists that fit them worse."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    squared = (centroids**2).sum(1)
    total = 0.0
    for start in range(0, len(vectors), block):
        rows = np.asarray(vectors[start : start + block], dtype=np.float32)
        nearest = (squared[None, :] - 2 * rows @ centroids.T).min(1) + (rows**2).sum(1)
        total += float(np.maximum(nearest, 0).sum())
    return total / max(len(vectors), 1)
