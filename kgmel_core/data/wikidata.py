"""Reading a Wikidata JSON entity dump (`latest-all.json[.gz|.bz2]`) into KB rows, streaming.

The dump is one JSON array with one entity per line (`[`, then `{...},` lines, then `]`). Each line
is parsed on its own, so memory does not grow with the dump; a line that is not valid JSON is
counted (with a few examples) and skipped, never fatal. Items keep their label and description in
one language and their claims whose main value is an item (the tail label is resolved later, from
the same dump), a point in time, a quantity, a string or a text in that language. Properties (`P…`
entities) give the relation labels. `novalue`/`somevalue` snaks, coordinates and other value types
are counted, not kept. Entities the dump marks as missing (deleted) are counted.

An uncompressed dump can be read as byte ranges (`partitions`), so several workers parse it at once.
"""

from __future__ import annotations

import bz2
import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO


@dataclass
class ParseStats:
    lines: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    deleted: int = 0
    items: int = 0
    properties: int = 0
    other_entities: int = 0
    kept_items: int = 0
    skipped: Counter = field(default_factory=Counter)  # why a claim was not kept

    def merge(self, other: ParseStats) -> None:
        for name in ("lines", "malformed", "deleted", "items", "properties", "other_entities", "kept_items"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.malformed_examples = (self.malformed_examples + other.malformed_examples)[:10]
        self.skipped.update(other.skipped)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "malformed_lines": self.malformed,
            "malformed_examples": self.malformed_examples,
            "deleted_entities": self.deleted,
            "items": self.items,
            "properties": self.properties,
            "other_entities": self.other_entities,
            "kept_items": self.kept_items,
            "claims_skipped": dict(self.skipped),
        }


@dataclass(frozen=True)
class Claim:
    property: str
    kind: str  # item | time | quantity | string
    value: str  # a QID for items, else the rendered literal
    unit: str | None = None  # a QID for quantities with a unit


@dataclass
class Entity:
    id: str
    type: str
    label: str | None
    description: str | None
    sitelinks: int
    claims: list[Claim]


def open_dump(path: Path) -> BinaryIO:
    """The dump as a binary stream, decompressing .gz / .bz2 on the fly."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")


def partitions(path: Path, count: int) -> list[tuple[int, int | None]]:
    """Byte ranges (start, end) that split an uncompressed dump into `count` parts; a compressed dump
    cannot be split and is one range. A line belongs to the range its first byte falls in."""
    path = Path(path)
    if path.suffix in (".gz", ".bz2") or count <= 1:
        return [(0, None)]
    size = path.stat().st_size
    bounds = [size * i // count for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(count)]


def dump_lines(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The lines whose first byte lies in [start, end) (all lines for a compressed dump)."""
    with open_dump(path) as handle:
        if start:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                handle.readline()  # the line in progress belongs to the previous range
        position = handle.tell()
        for line in handle:
            if end is not None and position >= end:
                break
            position += len(line)
            yield line


def parse_line(line: bytes, stats: ParseStats) -> dict | None:
    """One dump line as a JSON object, or None (array brackets, blank, malformed: counted)."""
    text = line.strip()
    if text.endswith(b","):
        text = text[:-1]
    if text in (b"", b"[", b"]"):
        return None
    stats.lines += 1
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        value, error = None, exc
    else:
        error = None if isinstance(value, dict) else TypeError(f"a JSON {type(value).__name__}, not an object")
    if error is not None:
        stats.malformed += 1
        if len(stats.malformed_examples) < 10:
            stats.malformed_examples.append(f"{text[:80]!r}: {error}")
        return None
    return value


def _in_language(values: dict | None, language: str) -> str | None:
    entry = (values or {}).get(language)
    return entry.get("value") if isinstance(entry, dict) else None


def format_time(value: dict) -> str:
    """`+1952-03-11T00:00:00Z` at day precision -> `1952-03-11`; month -> `1952-03`; coarser -> `1952`
    (`-0427-...` -> `-427`, the dataset convention for years BC)."""
    time = value["time"]
    sign = "-" if time.startswith("-") else ""
    year, month, day = time.lstrip("+-").split("T")[0].split("-")
    year = year.lstrip("0") or "0"
    precision = int(value.get("precision", 11))
    if precision >= 11 and month != "00" and day != "00":
        return f"{sign}{year}-{month}-{day}"
    if precision == 10 and month != "00":
        return f"{sign}{year}-{month}"
    return f"{sign}{year}"


def claim_value(snak: dict, language: str) -> tuple[Claim | None, str | None]:
    """(claim, None) for a kept main snak, or (None, reason it was skipped)."""
    if snak.get("snaktype") != "value":
        return None, snak.get("snaktype", "no snaktype")
    datavalue = snak.get("datavalue") or {}
    kind, value, prop = datavalue.get("type"), datavalue.get("value"), snak.get("property", "")
    if kind == "wikibase-entityid" and isinstance(value, dict) and value.get("entity-type") == "item":
        return Claim(prop, "item", value.get("id") or f"Q{value['numeric-id']}"), None
    if kind == "time" and isinstance(value, dict):
        return Claim(prop, "time", format_time(value)), None
    if kind == "quantity" and isinstance(value, dict):
        unit = value.get("unit", "1").rsplit("/", 1)[-1]
        return Claim(prop, "quantity", value["amount"].lstrip("+"), unit if unit.startswith("Q") else None), None
    if kind == "string" and isinstance(value, str):
        return Claim(prop, "string", value), None
    if kind == "monolingualtext" and isinstance(value, dict):
        if value.get("language") == language:
            return Claim(prop, "string", value["text"]), None
        return None, "monolingualtext in another language"
    return None, kind or "no datavalue"


def read_entity(obj: dict, language: str, stats: ParseStats, with_claims: bool) -> Entity | None:
    """An item or property of the dump (claims only when asked: they cost the most to read)."""
    if "missing" in obj:
        stats.deleted += 1
        return None
    entity_type = obj.get("type")
    if entity_type == "item":
        stats.items += 1
    elif entity_type == "property":
        stats.properties += 1
    else:
        stats.other_entities += 1
        return None
    claims = []
    if with_claims:
        for statements in (obj.get("claims") or {}).values():
            for statement in statements:
                if statement.get("rank") == "deprecated":
                    stats.skipped["deprecated"] += 1
                    continue
                claim, reason = claim_value(statement.get("mainsnak") or {}, language)
                if claim is None:
                    stats.skipped[reason] += 1
                else:
                    claims.append(claim)
    return Entity(
        obj.get("id", ""),
        entity_type,
        _in_language(obj.get("labels"), language),
        _in_language(obj.get("descriptions"), language),
        len(obj.get("sitelinks") or {}),
        claims,
    )


@dataclass(frozen=True)
class KBFilter:
    """Which items become KB entities: an explicit QID list, or items with a label in the language and
    at least `min_sitelinks` sitelinks."""

    qids: frozenset[str] | None = None
    min_sitelinks: int = 0

    def keeps(self, entity: Entity) -> bool:
        if entity.type != "item" or not entity.label:
            return False
        if self.qids is not None:
            return entity.id in self.qids
        return entity.sitelinks >= self.min_sitelinks

    @classmethod
    def from_file(cls, path: Path) -> KBFilter:
        """A QID list file: one QID per line, or a JSON list (e.g. a benchmark's candidate list)."""
        text = Path(path).read_text()
        qids = json.loads(text) if text.lstrip().startswith("[") else text.split()
        return cls(qids=frozenset(str(q) for q in qids))
