"""Building a KB from a Wikidata JSON dump: `entities`, `kb_triples`, `properties` (what ingest reads).

Two streaming passes over the dump, both in bounded memory: pass 1 (`parse_partition`) keeps the
selected items (label, description, claims) and every property's label; pass 2 (`label_pass`) writes
every item's label and description so item-valued tails get their label. Both write Parquet parts of at
most `PART_ROWS` rows into a scratch folder; DuckDB joins them (spilling to disk when it must) into the
KB tables, which `write_kb_tables` hands out batch by batch. Pass 1 runs on byte ranges of an
uncompressed dump, so ranges can be parsed in parallel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from kgmel_core import schemas
from kgmel_core.data.wikidata import KBFilter, ParseStats, dump_lines, parse_line, read_entity

TableSink = Callable[[str, pa.Table, pa.Schema], None]
"""Where the KB tables go (an artifact writer's `write_table`): called once per batch of a table."""

PART_ROWS = 50_000
CLAIMS = pa.schema([("head_qid", pa.string()), ("property", pa.string()), ("kind", pa.string()),
                    ("value", pa.string()), ("unit", pa.string())])
LABELS = pa.schema([("qid", pa.string()), ("label", pa.string()), ("description", pa.string())])


def dump_fingerprint(path: Path) -> str:
    """Name, size, mtime and the first and last MiB: a dump is tens of GB, hashing it whole would
    cost minutes on every run; a changed dump changes these."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, stat.st_size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()


class PartWriter:
    """Rows into numbered Parquet parts of at most `PART_ROWS` rows (memory stays bounded)."""

    def __init__(self, folder: Path, schema: pa.Schema, prefix: str):
        self.folder, self.schema, self.prefix = folder, schema, prefix
        self.rows: list[dict] = []
        self.parts = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            pq.write_table(pa.Table.from_pylist(self.rows, self.schema),
                           self.folder / f"{self.prefix}-{self.parts:05d}.parquet")
            self.parts += 1
            self.rows = []


def parse_partition(
    dump: Path, start: int, end: int | None, language: str, keep: KBFilter, scratch: Path, index: int
) -> ParseStats:
    """Pass 1 over one byte range: selected items and their claims, and all properties."""
    stats = ParseStats()
    entities = PartWriter(scratch / "entities", LABELS, f"p{index}")
    claims = PartWriter(scratch / "claims", CLAIMS, f"p{index}")
    properties = PartWriter(scratch / "properties", LABELS, f"p{index}")
    for line in dump_lines(dump, start, end):
        obj = parse_line(line, stats)
        if obj is None:
            continue
        entity = read_entity(obj, language, stats, with_claims=obj.get("type") == "item" and _may_keep(obj, keep))
        if entity is None:
            continue
        if entity.type == "property":
            properties.add({"qid": entity.id, "label": entity.label or entity.id, "description": entity.description})
        elif keep.keeps(entity):
            stats.kept_items += 1
            entities.add({"qid": entity.id, "label": entity.label, "description": entity.description})
            for claim in entity.claims:
                claims.add({"head_qid": entity.id, "property": claim.property, "kind": claim.kind,
                            "value": claim.value, "unit": claim.unit})
    for writer in (entities, claims, properties):
        writer.flush()
    return stats


def _may_keep(obj: dict, keep: KBFilter) -> bool:
    """Cheap pre-check before reading claims (most of a dump is not selected)."""
    if keep.qids is not None:
        return obj.get("id") in keep.qids
    return len(obj.get("sitelinks") or {}) >= keep.min_sitelinks


def label_pass(dump: Path, language: str, scratch: Path) -> ParseStats:
    """Pass 2: every item's label and description (for the tails), in parts."""
    stats = ParseStats()
    labels = PartWriter(scratch / "labels", LABELS, "labels")
    for line in dump_lines(dump):
        obj = parse_line(line, stats)
        if obj is None or obj.get("type") != "item":
            continue
        entity = read_entity(obj, language, stats, with_claims=False)
        if entity is not None and entity.label:
            labels.add({"qid": entity.id, "label": entity.label, "description": entity.description})
    labels.flush()
    return stats


TRIPLES_SQL = """
select c.head_qid,
       coalesce(p.label, c.property) as relation,
       p.description as relation_description,
       case when c.kind = 'item' then coalesce(t.label, c.value)
            when c.kind = 'quantity' and c.unit is not null then c.value || ' ' || coalesce(u.label, c.unit)
            else c.value end as tail,
       case when c.kind = 'item' then t.description end as tail_description,
       c.kind = 'item' and t.label is null as unresolved
from read_parquet({claims}) c
left join read_parquet({properties}) p on p.qid = c.property
left join read_parquet({labels}) t on c.kind = 'item' and t.qid = c.value
left join read_parquet({labels}) u on c.kind = 'quantity' and u.qid = c.unit
"""


def _files(folder: Path) -> str | None:
    """A DuckDB list of the folder's Parquet files (None when it has none), relative to the scratch
    folder (`file_search_path`): DuckDB would read `[`, `?` or `*` in an absolute path as a glob."""
    files = sorted(f"{folder.name}/{f.name}" for f in folder.glob("*.parquet"))
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]" if files else None


def write_kb_tables(write: TableSink, scratch: Path) -> int:
    """Joins the parts of both passes into the KB tables; returns the number of item tails without a label."""
    for folder in ("entities", "claims", "properties", "labels"):
        (scratch / folder).mkdir(parents=True, exist_ok=True)
    with duckdb.connect() as con:
        con.execute("set temp_directory = $1", [str(scratch / "duckdb-tmp")]).fetchall()
        con.execute("set file_search_path = $1", [str(scratch)]).fetchall()
        unresolved = 0
        parts = {name: _files(scratch / name) for name in ("entities", "claims", "properties", "labels")}
        entities = con.sql(
            f"select qid, label, coalesce(description, '') as description, null::varchar as image_path, "
            f"null::varchar as image_sha256 from read_parquet({parts['entities']}) order by qid"
        ) if parts["entities"] else None
        _copy(write, "entities", entities, schemas.ENTITIES)
        if parts["claims"]:
            sql = TRIPLES_SQL.format(claims=parts["claims"], properties=parts["properties"] or "[]",
                                     labels=parts["labels"] or "[]")
            unresolved = con.execute(f"select count(*) from ({sql}) where unresolved").fetchall()[0][0]
            _copy(write, "kb_triples", con.sql(f"select * exclude (unresolved) from ({sql}) order by all"),
                  schemas.KB_TRIPLES)
        else:
            _copy(write, "kb_triples", None, schemas.KB_TRIPLES)
        properties = con.sql(
            f"select qid as pid, label, description from read_parquet({parts['properties']}) order by pid"
        ) if parts["properties"] else None
        _copy(write, "properties", properties, schemas.PROPERTIES)
    return int(unresolved)


def _copy(write, name: str, result, schema: pa.Schema) -> None:
    """A DuckDB result into the artifact, one part per record batch (never the whole table in memory)."""
    if result is None:
        write(name, schema.empty_table(), schema)
        return
    reader = result.arrow(batch_size=PART_ROWS)  # a RecordBatchReader: batches stream out of DuckDB
    wrote = False
    for batch in reader:
        write(name, pa.Table.from_batches([batch]), schema)
        wrote = True
    if not wrote:
        write(name, schema.empty_table(), schema)
