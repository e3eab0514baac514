"""Prompt texts. Few-shot and completion-shaped, so a chat model follows them as instructions and a
small base model (the offline default) continues the pattern instead of echoing the question."""

from __future__ import annotations

from dataclasses import dataclass, field

from kgmel_core.llm.client import image_data_url

# ~20 frequent Wikidata properties the reference prompt steers towards.
PREFERRED_RELATIONS = [
    "instance of",
    "occupation",
    "country",
    "country of citizenship",
    "located in",
    "member of",
    "part of",
    "genre",
    "industry",
    "headquarters location",
    "position held",
    "employer",
    "educated at",
    "participant in",
    "sport",
    "member of sports team",
    "owned by",
    "operator",
    "founded by",
    "award received",
]
ENTITY_TYPES = [
    "person",
    "organization",
    "company",
    "band",
    "sports team",
    "city",
    "country",
    "region",
    "river",
    "mountain",
    "building",
    "event",
    "ship",
    "vehicle",
    "product",
    "work of art",
    "film",
    "book",
    "award",
    "other",
]

GENERATION_INSTRUCTION = (
    "Describe the mention in the sentence (and the image, if given) as knowledge-graph triples whose head is "
    f"the mention. Entity type: one of {', '.join(ENTITY_TYPES)}. Prefer these relations: "
    f"{', '.join(PREFERRED_RELATIONS)}. Follow the format of the example exactly."
)
GENERATION_EXAMPLE = """Sentence: Michael Jordan, a basketball player from the United States, scored 40 points.
Mention: Michael Jordan
Type: person
Description: American basketball player
Triples:
- "Michael Jordan" | instance of | human
- "Michael Jordan" | occupation | basketball player
- "Michael Jordan" | country of citizenship | United States
"""


# Where an answer ends: a base model would go on to invent the next example.
GENERATION_STOP = ["\n\n", "\nSentence:"]
RERANK_STOP = ["\n"]


def generation_messages(
    sentence: str,
    mention: str,
    image_path: str | None,
    max_triples: int,
    send_image: bool,
    instruction: bool = True,
) -> list[dict]:
    """Without `instruction` the prompt is the example alone: a small base model echoes instructions
    but continues a pattern."""
    head = f"{GENERATION_INSTRUCTION} Write at most {max_triples} triples.\n\n" if instruction else ""
    text = f"{head}{GENERATION_EXAMPLE}\nSentence: {sentence}\nMention: {mention}\nType:"
    if send_image and image_path:
        content = [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": image_data_url(image_path)}},
        ]
        return [{"role": "user", "content": content}]
    return [{"role": "user", "content": text}]


@dataclass
class CandidateCard:
    qid: str
    label: str
    description: str
    triples: list[tuple[str, str]] = field(default_factory=list)


RERANK_INSTRUCTION = (
    "Which candidate entity does the mention refer to? Use the sentence, the mention's triples and the "
    "candidates' facts. Answer with the QID of one candidate only."
)
RERANK_EXAMPLE = """Candidates:
[2] Jordan (Q810): country in Western Asia
  - instance of | country
[1] Michael Jordan (Q41421): American basketball player
  - occupation | basketball player
Sentence: Jordan scored 40 points for the Bulls.
Mention: Jordan
Mention triples:
- occupation | basketball player
Answer: Q41421
"""


def rerank_messages(
    sentence: str,
    mention: str,
    mention_triples: list[tuple[str, str]],
    candidates: list[CandidateCard],
    instruction: bool = True,
) -> list[dict]:
    """Candidates are listed in reverse retrieval order (the reference reports this works better),
    numbered by retrieval rank so `[1]` is always the retriever's top choice."""
    lines = ([RERANK_INSTRUCTION, ""] if instruction else []) + [RERANK_EXAMPLE, "Candidates:"]
    for rank in range(len(candidates), 0, -1):
        card = candidates[rank - 1]
        lines.append(f"[{rank}] {card.label} ({card.qid}): {card.description or 'no description'}")
        lines += [f"  - {relation} | {tail}" for relation, tail in card.triples]
    lines += [f"Sentence: {sentence}", f"Mention: {mention}", "Mention triples:"]
    lines += [f"- {relation} | {tail}" for relation, tail in mention_triples] or ["- none"]
    lines.append("Answer:")
    return [{"role": "user", "content": "\n".join(lines)}]


def rerank_requests(
    mentions: list[dict],
    candidates: dict[str, list[str]],
    entities: dict[str, dict],
    filtered: dict[tuple[str, str], list[tuple[str, str]]],
    generated: dict[str, list[tuple[str, str]]],
    instruction: bool = True,
) -> tuple[list[tuple[str, list[dict]]], dict[str, list[tuple[str, str]]]]:
    """(mention_id, messages) per mention that has candidates, and each one's (qid, label) options
    in retrieval order, which is what the answer parser resolves indices and labels against."""
    requests, options = [], {}
    for row in mentions:
        mid = row["mention_id"]
        cards = [
            CandidateCard(q, entities[q]["label"], entities[q]["description"], filtered.get((mid, q), []))
            for q in candidates.get(mid, [])
            if q in entities
        ]
        if not cards:
            continue
        options[mid] = [(c.qid, c.label) for c in cards]
        messages = rerank_messages(row["sentence"], row["mention"], generated.get(mid, []), cards, instruction)
        requests.append((mid, messages))
    return requests, options
