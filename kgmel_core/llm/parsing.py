"""Lenient parsing of LLM output: generated triples and rerank answers.

Generation answers come in the compact format the prompt asks for (`kgmel_core.llm.prompts`); models
not held to it by a grammar also answer in numbered lists, `a | b | c`, `(a, b, c)`, JSON, or prose
around any of those. The parser takes what it can and says when it found nothing, so the stage can
record the raw text as a parse failure instead of silently dropping the mention.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_BULLET = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•]|\u2022)\s*")
_QID = re.compile(r"\bQ\d+\b")
_TYPE_WORDS = re.compile(r"^[A-Za-z][A-Za-z \-]{0,40}$")  # "person", "sports team"
_QUOTES = "\"'`“”‘’"
_COMPACT_HEAD = re.compile(r"^([A-Za-z][A-Za-z \-]{0,40});\s*(.*)$")  # "person; American actress"
_FACT = re.compile(r"^(?:[-*•]\s*)?([A-Za-z][A-Za-z0-9 '\-]{0,60}?)\s*:\s*(\S.*)$")  # "occupation: actress"


@dataclass
class GeneratedTriples:
    entity_type: str | None = None
    description: str | None = None
    triples: list[tuple[str, str]] = field(default_factory=list)  # (relation, tail); head is the mention
    dropped_line: bool = False  # the answer was cut at the token limit and its last line dropped

    @property
    def ok(self) -> bool:
        return bool(self.triples)


def _clean(part: str) -> str:
    return part.strip().strip(_QUOTES).strip().rstrip(".,;").strip().strip(_QUOTES).strip()


def _from_json(text: str) -> list[list[str]] | None:
    for opener, closer in (("[", "]"), ("{", "}")):
        start, end = text.find(opener), text.rfind(closer)
        if start < 0 or end <= start:
            continue
        try:
            data = json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            data = data.get("triples", [data])
        rows = []
        for item in data if isinstance(data, list) else []:
            if isinstance(item, list | tuple) and len(item) in (2, 3):
                rows.append([str(x) for x in item])
            elif isinstance(item, dict):
                rel = item.get("relation") or item.get("predicate") or item.get("r")
                tail = item.get("tail") or item.get("object") or item.get("t")
                head = item.get("head") or item.get("subject") or item.get("h") or ""
                if rel and tail:
                    rows.append([str(head), str(rel), str(tail)])
        if rows:
            return rows
    return None


def _from_line(line: str) -> list[str] | None:
    body = _BULLET.sub("", line).strip()
    if "|" in body:
        parts = [p for p in (_clean(x) for x in body.split("|")) if p]
        return parts if len(parts) in (2, 3) else (parts[:3] if len(parts) > 3 else None)
    if body.startswith("(") and body.count(",") >= 2:
        inner = body[1 : body.rfind(")")] if ")" in body else body[1:]
        parts = [_clean(x) for x in inner.split(",")]
        if len(parts) > 3:  # commas inside the tail: keep them there
            parts = [parts[0], parts[1], ", ".join(parts[2:])]
        return parts if all(parts) else None
    return None


def _compact_rows(lines: list[str]) -> tuple[str, str, list[list[str]]] | None:
    """(type, description, rows) from the compact format (`type; description`, then `relation: object`
    lines), or None when the first line is not its head."""
    head = _COMPACT_HEAD.match(lines[0].strip()) if lines else None
    if head is None:
        return None
    rows = [[m.group(1), m.group(2)] for m in (_FACT.match(line.strip()) for line in lines[1:]) if m]
    return head.group(1), head.group(2), rows


def _legacy_rows(text: str, lines: list[str], out: GeneratedTriples) -> list[list[str]]:
    """Rows from the other shapes models answer in: `Type:`/`Description:` sections, `a | b | c`,
    `(a, b, c)`, JSON."""
    # The reference prompt ends with "Type:", so an answer's first line may be the type itself.
    if lines and _TYPE_WORDS.match(lines[0].strip()):
        out.entity_type = _clean(lines[0])
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip().lower() == "type" and value.strip():
            out.entity_type = _clean(value)
        elif key.strip().lower() == "description" and value.strip():
            out.description = _clean(value)
    rows = _from_json(text) if ("[" in text or "{" in text) and "|" not in text else None
    return rows if rows is not None else [r for r in (_from_line(line) for line in lines) if r]


def parse_generation(text: str, mention: str, max_triples: int = 8, truncated: bool = False) -> GeneratedTriples:
    """Triples (and the type and description, when present) from a generation answer: the compact format
    the prompt asks for, else whatever shape the model chose.

    `truncated`: the answer stopped at the token limit, so its last line may be cut mid-fact
    ("country: Unit"); that line is dropped rather than stored as a fact."""
    out = GeneratedTriples()
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if truncated and lines:
        lines, out.dropped_line = lines[:-1], True
    compact = None if any("|" in line for line in lines) else _compact_rows(lines)
    if compact is not None:
        entity_type, description, rows = compact
        out.entity_type, out.description = _clean(entity_type), _clean(description) or None
    else:
        rows = _legacy_rows("\n".join(lines), lines, out)
    seen = set()
    for row in rows:
        relation, tail = (row[1], row[2]) if len(row) == 3 else (row[0], row[1])
        relation, tail = _clean(relation), _clean(tail)
        if not relation or not tail or relation.lower() in ("relation", "type", "description", "triples"):
            continue
        if (relation.lower(), tail.lower()) in seen:
            continue
        seen.add((relation.lower(), tail.lower()))
        out.triples.append((relation, tail))
    out.triples = out.triples[:max_triples]
    if out.entity_type and out.triples and not any(r.lower() == "instance of" for r, _ in out.triples):
        out.triples.insert(0, ("instance of", out.entity_type))  # the reference adds it when missing
        out.triples = out.triples[:max_triples]
    return out


def parse_rerank_answer(text: str, candidates: list[tuple[str, str]]) -> tuple[str | None, str]:
    """(qid, how) from a rerank answer; candidates are (qid, label) in retrieval order (index 1 = first).

    Tries a candidate QID, then a `[n]`/leading number, then a candidate label; (None, "unparsed")
    when nothing matches, including a QID that is not among the candidates.
    """
    text = (text or "").strip()
    qids = [qid for qid, _ in candidates]
    for found in _QID.findall(text):
        if found in qids:
            return found, "qid"
    if _QID.search(text) and not re.search(r"\[\d+\]", text):
        return None, "qid_not_in_candidates"
    number = re.match(r"^\s*\[?(\d+)\]?(?:\W|$)", text) or re.search(r"\[(\d+)\]", text)
    if number and 1 <= int(number.group(1)) <= len(candidates):
        return qids[int(number.group(1)) - 1], "index"
    lowered = text.lower()
    matches = [(len(label), qid) for qid, label in candidates if label and label.lower() in lowered]
    if matches:
        best = max(matches)
        if sum(1 for length, _ in matches if length == best[0]) == 1:
            return best[1], "label"
    return None, "unparsed"
