"""Readers for the MIMIC/KGMEL benchmark layout (WikiMEL, RichpediaMEL, WikiDiverse).

On-disk layout (every path can be overridden in `DatasetLayout`):

    <root>/<Name>.json         list of sentences: id, sentence, mention[], entity[], answer[], imgPath
    <root>/splits.json         {"train": [ids], "val": [ids], "test": [ids]}
    <root>/mention_images/     files named by imgPath (optional: absent images are counted)
    <root>/kb/entities.json    {qid: {"label", "description", "image"}} or a list of {"qid", ...}
    <root>/kb/images/          entity images named by "image"
    <root>/kb/triples.tsv      head_qid <TAB> relation <TAB> tail   (no header)
    <root>/PID2Label.tsv       optional: property id <TAB> label <TAB> description

Bad input raises `DatasetError` naming file, record and field. Things that are allowed but lossy
(missing images, ids in several splits, a KB built from gold answers) are counted in `stats`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import polars as pl
from PIL import Image

from kgmel_core import schemas
from kgmel_core.config import DatasetConfig
from kgmel_core.data.texts import window_start

SPLITS = ("train", "val", "test")
# When an id is listed in several splits, the evaluation split wins so training never sees it.
_SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}
log = logging.getLogger(__name__)
_QID = re.compile(r"^Q\d+$")


class DatasetError(ValueError):
    """Malformed dataset input; the message names the file, the record and the field (also kept as
    attributes, so `bad_records: skip` can file the record in the `rejected` table)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


BadRecordPolicy = Literal["fail", "skip"]


@dataclass
class Rejects:
    """Where `bad_records: skip` puts what it drops: one row per bad record, never a silent skip."""

    policy: BadRecordPolicy = "fail"
    rows: list[dict[str, Any]] = field(default_factory=list)

    def handle(self, error: DatasetError, file: str, record: int | str, record_id: str | None) -> None:
        if self.policy == "fail":
            raise error
        self.rows.append(
            {"file": file, "record": str(record), "record_id": record_id, "field": error.field, "reason": str(error)}
        )
        log.warning("skipped bad record (dataset.bad_records=skip): %s", error)

    def table(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema=pl.Schema(schemas.REJECTED))


def _default(name: str) -> Any:
    return DatasetConfig.model_fields[name].default  # the `dataset.*` settings declare the defaults


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset's files are: the `dataset.*` path settings resolved against its root."""

    root: Path
    mentions_file: str | None = _default("mentions_file")  # None: the one JSON list beside splits.json
    splits_file: str = "splits.json"
    mention_image_dir: str = _default("mention_image_dir")
    kb_entities_file: str = _default("kb_entities_file")
    kb_image_dir: str = _default("kb_image_dir")
    kb_triples_file: str = _default("kb_triples_file")
    property_labels_file: str = _default("property_labels_file")

    @classmethod
    def of(cls, config: DatasetConfig) -> DatasetLayout:
        names = {f.name for f in fields(cls)} - {"root"}
        return cls(root=Path(config.path).resolve(), **config.model_dump(include=names))

    def preflight(self, kb_only: bool = False) -> None:
        """The files a run will read exist: checked before Prefect starts, so a typo in `dataset.path`
        fails in a second with the setting's name instead of inside the ingest stage."""
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise DatasetError(f"dataset.path: {self.root} {what}")
        if kb_only:  # the KB files are optional (a KB can come from the mentions' own entity records)
            return
        if not (self.root / self.splits_file).is_file():
            raise DatasetError(f"dataset.path: {self.root} has no {self.splits_file}")
        if not self.resolve_mentions_file().is_file():
            raise DatasetError(f"dataset.mentions_file: {self.resolve_mentions_file()} does not exist")

    def resolve_mentions_file(self) -> Path:
        if self.mentions_file:
            return self.root / self.mentions_file
        skip = {self.splits_file, Path(self.kb_entities_file).name}
        candidates = sorted(p for p in self.root.glob("*.json") if p.name not in skip)
        if len(candidates) != 1:
            raise DatasetError(
                f"{self.root}: expected exactly one mentions JSON file, found {[p.name for p in candidates]}; "
                "set mentions_file"
            )
        return candidates[0]

    def input_files(self) -> list[Path]:
        """Files whose content defines the dataset (hashed into the ingest key)."""
        files = [self.resolve_mentions_file(), self.root / self.splits_file]
        for optional in (self.kb_entities_file, self.kb_triples_file, self.property_labels_file):
            if (self.root / optional).is_file():
                files.append(self.root / optional)
        return files


@dataclass(frozen=True)
class InputLimits:
    """What one input may cost, from the `dataset.*` settings: a longer sentence is cut to a window around
    its mention and a larger image counted as none (both counted), a file with more mentions refused."""

    max_sentence_chars: int = _default("max_sentence_chars")
    max_mentions: int = _default("max_mentions")
    max_image_pixels: int = _default("max_image_pixels")

    @classmethod
    def of(cls, config: DatasetConfig) -> InputLimits:
        return cls(**config.model_dump(include={f.name for f in fields(cls)}))


@dataclass
class Dataset:
    mentions: pl.DataFrame
    entities: pl.DataFrame
    kb_triples: pl.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)
    rejected: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=pl.Schema(schemas.REJECTED)))


class _ObjectWithDuplicates(dict):
    """A JSON object that named a key more than once: `json` keeps the last value silently, so the
    pairs are kept too, in file order, for the reader to refuse or reject the repeats."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.pairs = pairs


def _repeated_keys(obj: Any) -> list[str]:
    if not isinstance(obj, _ObjectWithDuplicates):
        return []
    return sorted(k for k, n in Counter(k for k, _ in obj.pairs).items() if n > 1)


def _check_unique(obj: dict, key_field: str, key: str, seen: set[str], where: str) -> None:
    """A record names each field once, and its key (sentence id, QID) is new in its file."""
    if repeated := _repeated_keys(obj):
        raise DatasetError(f"{where}: field {repeated[0]!r} appears more than once", repeated[0])
    if key in seen:
        raise DatasetError(f"{where}: duplicate field {key_field!r}", key_field)
    seen.add(key)


def _object(pairs: list[tuple[str, Any]]) -> dict:
    return _ObjectWithDuplicates(pairs) if len({k for k, _ in pairs}) < len(pairs) else dict(pairs)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(), object_pairs_hook=_object)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None


def _require_str(value: Any, where: str, field_name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DatasetError(f"{where}: field {field_name!r} must be a non-empty string, got {value!r}", field_name)
    return value


@dataclass
class ImageCheck:
    """What ingest found of the images a dataset names: unusable files are counted and named."""

    max_pixels: int = _default("max_image_pixels")
    bad: list[dict[str, str]] = field(default_factory=list)
    too_large: int = 0  # of `bad`: over max_pixels, never decoded

    def stats(self, side: str, examples: int = 20) -> dict[str, Any]:
        return {f"bad_{side}_images": len(self.bad), f"{side}_images_over_max_pixels": self.too_large,
                f"bad_{side}_image_examples": self.bad[:examples]}


class _ImageTooLarge(ValueError):
    pass


def _image(
    folder: Path | None, name: Any, where: str, field_name: str, check: ImageCheck
) -> tuple[str | None, str | None]:
    """(path, sha256) of an image, or (None, None) when the name is empty or the file is absent or
    unusable (0 bytes, not an image, truncated: recorded in `check`, named, counted as no image).

    A name that resolves outside `folder` (`../`, an absolute path, a symlink out) stops ingest:
    its bytes could otherwise be sent to a remote model as an "image".
    """
    if not name or folder is None:
        return None, None
    if not isinstance(name, str):
        raise DatasetError(f"{where}: field {field_name!r} must be a file name, got {name!r}", field_name)
    root = folder.resolve()
    path = (folder / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root):
        raise DatasetError(
            f"{where}: field {field_name!r} = {name!r} resolves outside the image folder {root}", field_name
        )
    if not path.is_file():
        return None, None
    data = path.read_bytes()
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as image:  # reads the header only
            if image.width * image.height > check.max_pixels:
                check.too_large += 1
                raise _ImageTooLarge(f"{image.width}x{image.height} pixels, over dataset.max_image_pixels="
                                     f"{check.max_pixels:,}")
            image.load()  # decodes every pixel: a truncated file fails here, not later in `embed`
    except Exception as exc:  # PIL raises many types for bad files; every one means "no usable image"
        message = str(exc).replace(repr(buffer), path.name)  # PIL names the buffer: "<_io.BytesIO object at 0x…>"
        check.bad.append({"file": str(path), "record": where, "reason": f"{type(exc).__name__}: {message}"[:200]})
        log.warning("%s: image %s is not usable (%s); counted as no image", where, path, message)
        return None, None
    return str(path), hashlib.sha256(data).hexdigest()


def read_splits(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Map sentence id -> split; ids listed in several splits go to the evaluation split (counted)."""
    raw = _load_json(path)
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected an object of split name -> list of ids")
    if repeated := _repeated_keys(raw):
        raise DatasetError(f"{path}: split {repeated[0]!r} is listed more than once")
    unknown = set(raw) - set(SPLITS)
    if unknown:
        raise DatasetError(f"{path}: unknown split names {sorted(unknown)}; allowed {SPLITS}")
    assignment: dict[str, str] = {}
    conflicts = 0
    for split in sorted(raw, key=_SPLIT_PRIORITY.__getitem__):
        ids = raw[split]
        if not isinstance(ids, list):
            raise DatasetError(f"{path}: split {split!r} must be a list of ids")
        for sid in ids:
            sid = str(sid)
            if sid in assignment:
                conflicts += 1
                continue
            assignment[sid] = split
    return assignment, {"ids_in_several_splits": conflicts}


def read_property_labels(path: Path) -> dict[str, tuple[str, str]]:
    if not path.is_file():
        return {}
    table = pl.read_csv(
        path, separator="\t", has_header=False, new_columns=["pid", "label", "description"], quote_char=None
    )
    return {row[0]: (row[1], row[2] or "") for row in table.iter_rows()}


def sentence_window(sentence: str, mention: str, max_chars: int) -> str:
    """At most `max_chars` of `sentence`, centred on the first occurrence of `mention` (the start when
    it does not occur): the words around a mention are what the encoders and the reranker read."""
    at = sentence.lower().find(mention.lower())
    start = window_start(len(sentence), at + len(mention) // 2 if at >= 0 else 0, max_chars)
    return sentence[start : start + max_chars]


def _mention_rows(
    record: Any,
    index: int,
    file: str,
    splits: dict[str, str] | None,
    image_dir: Path | None,
    images: ImageCheck,
    seen_ids: set[str],
    stats: dict[str, Any],
    require_gold: bool,
    max_sentence_chars: int,
) -> list[dict[str, Any]]:
    """The mention rows of one sentence record; raises DatasetError naming record and field."""
    where = f"{file}: record {index}"
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object, got {type(record).__name__}")
    if "id" not in record:
        raise DatasetError(f"{where}: missing field 'id'", "id")
    sid = str(record["id"])
    where = f"{file}: record {index} (id={sid})"
    _check_unique(record, "id", sid, seen_ids, where)
    sentence = _require_str(record.get("sentence"), where, "sentence")
    lists = {}
    for name in ("mention", "entity", "answer"):
        if not require_gold and name != "mention" and record.get(name) is None:
            record = {**record, name: [None] * len(record.get("mention") or [])}
        value = record.get(name)
        if not isinstance(value, list):
            raise DatasetError(f"{where}: field {name!r} must be a list, got {value!r}", name)
        lists[name] = value
    if not len(lists["mention"]) == len(lists["entity"]) == len(lists["answer"]):
        raise DatasetError(
            f"{where}: fields 'mention', 'entity', 'answer' must have equal lengths, got "
            f"{len(lists['mention'])}, {len(lists['entity'])}, {len(lists['answer'])}",
            "mention",
        )
    split = splits.get(sid) if splits is not None else "link"
    if split is None:
        stats["sentences_without_split"] += 1
        return []
    for i, (mention, qid) in enumerate(zip(lists["mention"], lists["answer"], strict=True)):
        _require_str(mention, where, f"mention[{i}]")
        qid = None if qid is None else str(qid)
        if qid is None and require_gold or qid is not None and not _QID.match(qid):
            message = f"{where}: field 'answer[{i}]' must be a Wikidata QID like Q42, got {qid!r}"
            raise DatasetError(message, f"answer[{i}]")
    image_path, image_hash = _image(image_dir, record.get("imgPath"), where, "imgPath", images)
    if len(sentence) > max_sentence_chars:
        stats["sentences_cut"] += 1
        sentence = sentence_window(sentence, lists["mention"][0] if lists["mention"] else "", max_sentence_chars)
    lowered = sentence.lower()
    for i, mention in enumerate(lists["mention"]):
        if mention.lower() not in lowered:  # kept (see read_mentions), but never unnoticed
            stats["mentions_not_in_sentence"] += 1
            if len(stats["mentions_not_in_sentence_examples"]) < 20:
                stats["mentions_not_in_sentence_examples"].append(f"{where}: mention[{i}] {mention[:80]!r}")
    rows = []
    for i, (mention, label, qid) in enumerate(zip(lists["mention"], lists["entity"], lists["answer"], strict=True)):
        if image_path is None:
            stats["mentions_without_image"] += 1
        rows.append(
            {
                "mention_id": f"{sid}-{i}",
                "sentence_id": sid,
                "sentence": sentence,
                "mention": mention,
                "split": split,
                "gold_qid": None if qid is None else str(qid),
                "gold_label": label if isinstance(label, str) else None,
                "image_path": image_path,
                "image_sha256": image_hash,
            }
        )
    return rows


def read_mentions(
    path: Path | None,
    splits: dict[str, str] | None,
    image_dir: Path | None,
    records: list | None = None,
    require_gold: bool = True,
    rejects: Rejects | None = None,
    limits: InputLimits = InputLimits(),
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Mentions from a MIMIC JSON file (or the same records given directly).

    `splits=None` puts every sentence in split "link"; `require_gold=False` allows records
    without `entity`/`answer` (mentions to link, not to evaluate). A bad record stops reading
    (DatasetError), unless `rejects` has policy `skip`: then it is filed there and counted.
    """
    rejects = rejects or Rejects()
    if records is None:
        records = _load_json(path)
    path = path or Path("<records>")
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of sentence records")
    named = sum(len(r["mention"]) for r in records if isinstance(r, dict) and isinstance(r.get("mention"), list))
    if named > limits.max_mentions:
        raise DatasetError(f"{path}: {named:,} mentions, over dataset.max_mentions={limits.max_mentions:,}; "
                           "split the file or raise the setting", "mention")
    rows = []
    stats: dict[str, Any] = {"sentences": len(records), "sentences_without_split": 0, "mentions_without_image": 0,
                             "mentions_not_in_sentence": 0, "mentions_not_in_sentence_examples": [],
                             "sentences_cut": 0, "max_sentence_chars": limits.max_sentence_chars}
    images = ImageCheck(limits.max_image_pixels)
    seen_ids: set[str] = set()
    for index, record in enumerate(records):
        record_id = str(record["id"]) if isinstance(record, dict) and "id" in record else None
        try:
            rows += _mention_rows(record, index, path.name, splits, image_dir, images, seen_ids, stats, require_gold,
                                  limits.max_sentence_chars)
        except DatasetError as exc:
            rejects.handle(exc, path.name, index, record_id)
    stats["mentions"] = len(rows)
    stats.update(images.stats("mention"))
    if stats["mentions_not_in_sentence"]:
        # Kept: benchmarks normalise surfaces ("Hermann Beckerath" in "Hermann von Beckerath."), and such a
        # mention is still linkable from its sentence; a typo'd mention shows up in this count.
        log.warning("%s: %d mentions do not occur in their sentence (kept; counted as mentions_not_in_sentence), "
                    "e.g. %s", path.name, stats["mentions_not_in_sentence"],
                    stats["mentions_not_in_sentence_examples"][0])
    return pl.from_dicts(rows, schema=pl.Schema(schemas.MENTIONS)) if rows else pl.DataFrame(
        schema=pl.Schema(schemas.MENTIONS)
    ), stats


def _entity_row(item: Any, index: int, file: str, image_dir: Path, images: ImageCheck, seen: set[str]) -> dict:
    where = f"{file}: entity {index}"
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: expected an object")
    qid = str(item.get("qid", ""))
    if not _QID.match(qid):
        raise DatasetError(f"{where}: field 'qid' must be a Wikidata QID like Q42, got {item.get('qid')!r}", "qid")
    where = f"{file}: entity {index} (qid={qid})"
    _check_unique(item, "qid", qid, seen, where)
    label = _require_str(item.get("label"), where, "label")
    description = item.get("description") or ""
    _require_str(description, where, "description", allow_empty=True)
    image_path, image_hash = _image(image_dir, item.get("image"), where, "image", images)
    return {
        "qid": qid,
        "label": label,
        "description": description,
        "image_path": image_path,
        "image_sha256": image_hash,
    }


def _entity_item(qid: str, value: Any) -> dict:
    """One entry of the dict form as the list form's object (a repeated field inside it stays visible)."""
    if isinstance(value, _ObjectWithDuplicates):
        return _ObjectWithDuplicates([("qid", qid), *value.pairs])
    return {"qid": qid, **(value if isinstance(value, dict) else {"label": value})}


def read_entities(
    path: Path, image_dir: Path, rejects: Rejects | None = None, limits: InputLimits = InputLimits()
) -> tuple[pl.DataFrame, dict[str, int]]:
    raw = _load_json(path)
    if isinstance(raw, dict):  # every pair, repeats included: the second Q42 is refused like a list's
        pairs = raw.pairs if isinstance(raw, _ObjectWithDuplicates) else list(raw.items())
        items = [_entity_item(qid, value) for qid, value in pairs]
    elif isinstance(raw, list):
        items = raw
    else:
        raise DatasetError(f"{path}: expected an object qid -> entity or a list of entities")
    rejects = rejects or Rejects()
    rows, seen = [], set()
    stats: dict[str, Any] = {"entities_without_image": 0}
    images = ImageCheck(limits.max_image_pixels)
    for index, item in enumerate(items):
        try:
            rows.append(_entity_row(item, index, path.name, image_dir, images, seen))
        except DatasetError as exc:
            rejects.handle(exc, path.name, index, str(item.get("qid")) if isinstance(item, dict) else None)
            continue
        stats["entities_without_image"] += rows[-1]["image_path"] is None
    stats.update(images.stats("entity"))
    return pl.from_dicts(rows, schema=pl.Schema(schemas.ENTITIES)), stats


TRIPLE_COLUMNS = ["head_qid", "relation", "tail"]


def _triples_tsv(path: Path, rejects: Rejects) -> pl.DataFrame:
    """`triples.tsv` with its line numbers. Polars reads it in one go; a line with another number of
    fields than three makes it fail without a line number, so the file is then read line by line and
    each such line refused (or rejected) by number."""
    try:
        raw = pl.read_csv(
            path, separator="\t", has_header=False, quote_char=None, infer_schema=False, truncate_ragged_lines=False
        )
    except pl.exceptions.ComputeError:
        raw = None
    if raw is not None and raw.width == 3:
        return raw.rename(dict(zip(raw.columns, TRIPLE_COLUMNS, strict=True))).with_row_index("line", offset=1)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) != 3:
            error = DatasetError(f"{path}: line {number}: expected 3 tab-separated fields (head_qid, relation, "
                                 f"tail), found {len(fields)}", "line")
            rejects.handle(error, path.name, number, fields[0] or None)
            continue
        rows.append([number, *(field or None for field in fields)])
    schema = {"line": pl.UInt32, **dict.fromkeys(TRIPLE_COLUMNS, pl.String)}
    return pl.DataFrame(rows, schema=schema, orient="row")


def read_kb_triples(
    path: Path, known_qids: set[str], properties: dict[str, tuple[str, str]], rejects: Rejects | None = None
) -> tuple[pl.DataFrame, dict]:
    empty = pl.DataFrame(schema=pl.Schema(schemas.KB_TRIPLES))
    if not path.is_file():
        return empty, {"kb_triples": 0}
    rejects = rejects or Rejects()
    with_row = _triples_tsv(path, rejects)
    bad = with_row.filter(
        pl.col("head_qid").is_null()
        | pl.col("relation").is_null()
        | pl.col("tail").is_null()
        | ~pl.col("head_qid").str.contains(r"^Q\d+$")
    )
    for row in bad.iter_rows(named=True):
        problem = next((c for c in ("head_qid", "relation", "tail") if row[c] is None), "head_qid")
        error = DatasetError(
            f"{path}: line {row['line']}: bad triple {row} (head must be a QID; no empty fields)", problem
        )
        rejects.handle(error, path.name, row["line"], row["head_qid"])
    good = with_row.join(bad.select("line"), on="line", how="anti")
    repeats = good.with_columns(first_line=pl.col("line").min().over(TRIPLE_COLUMNS)).filter(
        pl.col("line") != pl.col("first_line")
    )
    for row in repeats.iter_rows(named=True):  # a repeated fact would count twice in every triple stage
        error = DatasetError(f"{path}: line {row['line']}: duplicate of line {row['first_line']} "
                             f"({row['head_qid']}, {row['relation']}, {row['tail']})", "line")
        rejects.handle(error, path.name, row["line"], row["head_qid"])
    raw = good.join(repeats.select("line"), on="line", how="anti").drop("line")
    unknown_head = raw.filter(~pl.col("head_qid").is_in(list(known_qids)))
    raw = raw.filter(pl.col("head_qid").is_in(list(known_qids)))
    labels = pl.DataFrame(
        {
            "relation": list(properties),
            "relation_label": [v[0] for v in properties.values()],
            "relation_description": [v[1] for v in properties.values()],
        },
        schema={"relation": pl.String, "relation_label": pl.String, "relation_description": pl.String},
    )
    table = (
        raw.join(labels, on="relation", how="left")
        .with_columns(
            relation=pl.coalesce("relation_label", "relation"),
            tail_description=pl.lit(None, pl.String),
        )
        .select(schemas.KB_TRIPLES.names)
        .unique(maintain_order=True)
    )
    return table, {"kb_triples": table.height, "kb_triples_unknown_head": unknown_head.height}


def read_dataset(
    layout: DatasetLayout,
    bad_records: BadRecordPolicy = "fail",
    kb: tuple[pl.DataFrame, pl.DataFrame] | None = None,
    limits: InputLimits = InputLimits(),
) -> Dataset:
    """Read a dataset; a missing KB file falls back to a KB of the gold answers (counted in stats).

    `kb`: (entities, kb_triples) built elsewhere (from a Wikidata dump): the dataset's KB files are
    not read. `bad_records="skip"` files each malformed record (mention record, KB entity, triple
    line) in `Dataset.rejected` with file, record, field and reason, and counts it, instead of stopping."""
    root = layout.root
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    rejects = Rejects(bad_records)
    splits, split_stats = read_splits(root / layout.splits_file)
    mentions, mention_stats = read_mentions(
        layout.resolve_mentions_file(), splits, root / layout.mention_image_dir, rejects=rejects, limits=limits
    )
    stats: dict[str, Any] = {**split_stats, **mention_stats}
    entities_path = root / layout.kb_entities_file
    if kb is not None:
        entities, triples = kb
        stats.update(kb_source="wikidata_dump", entities=entities.height, kb_triples=triples.height)
        stats["gold_missing_from_kb"] = mentions.filter(~pl.col("gold_qid").is_in(entities["qid"].implode())).height
        stats["rejected_records"] = len(rejects.rows)
        return Dataset(mentions, entities, triples, stats, rejects.table())
    if entities_path.is_file():
        entities, entity_stats = read_entities(entities_path, root / layout.kb_image_dir, rejects, limits)
        stats["kb_source"] = "kb_file"
    else:
        # WikiDiverse as shipped in shared/ has no KB: the entity side is the gold QIDs with their labels.
        entities = (
            mentions.filter(pl.col("gold_qid").is_not_null())
            .group_by("gold_qid", maintain_order=True)
            .agg(pl.col("gold_label").drop_nulls().first())
            .select(
                qid="gold_qid",
                label=pl.coalesce("gold_label", "gold_qid"),
                description=pl.lit(""),
                image_path=pl.lit(None, pl.String),
                image_sha256=pl.lit(None, pl.String),
            )
        )
        entity_stats = {"entities_without_image": entities.height}
        stats["kb_source"] = "gold_answers"
    stats.update(entity_stats)
    stats["entities"] = entities.height
    properties = read_property_labels(root / layout.property_labels_file)
    triples, triple_stats = read_kb_triples(root / layout.kb_triples_file, set(entities["qid"]), properties, rejects)
    stats.update(triple_stats)
    stats["gold_missing_from_kb"] = mentions.filter(~pl.col("gold_qid").is_in(entities["qid"].to_list())).height
    stats["rejected_records"] = len(rejects.rows)
    return Dataset(mentions=mentions, entities=entities, kb_triples=triples, stats=stats, rejected=rejects.table())
