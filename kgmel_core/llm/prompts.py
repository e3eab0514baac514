"""The prompts of stages 1 and 3, in the shape of the reference (design notes §6); the one place they live.

Both are chat prompts: a fixed system message (the same for every call, so a llama.cpp server
reuses its KV cache across calls) and a short user message. The code identity of a stage covers this
module, so editing a prompt gives `generate` / `rerank` new artifact keys.

Generation: a compact answer, `<type>; <short description>` and then one `<relation>: <object>` per
line (the mention is the head of every triple), relations preferably from ~20 frequent Wikidata
properties (`instance of <type>` is added by the parser when missing). A server that takes a grammar
(the packaged model's llama.cpp) is held to the format by `generation_grammar`.
Rerank: each candidate as `QID: Label, description [filtered triples]`, and the mention with its
sentence, generated description and triples; the answer is one QID. Layouts: the reference's
(candidates first, in reverse retrieval order, then the mention), `question_first` (the default,
better for a small model; see `rerank_messages`) and `numbered` (question first, the candidates
numbered and the answer a number).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

from kgmel_core.config import RerankLayout
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
    "founded by",
    "date of birth",
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

# The compact answer format: `<type>; <description>`, then one `<relation>: <object>` per line.
# Decoding is what a generation call costs on CPU (a token of output costs ~4 of prompt), so the format
# spends no token on the mention (the head of every triple), quotes or section headers. Two examples of
# different types: with one, the small model copied its relations into every answer. It names no number
# of facts: told "at most 5", the small model wrote 5 where it otherwise wrote 2-3 (the grammar and the
# parser enforce `max_triples`). The same for every call, so a llama.cpp slot reads it once.
GENERATION_SYSTEM = (
    "You describe an entity mention for a knowledge graph. Given a sentence and a mention in it, answer "
    "with the mention's type and a short description on the first line, then one fact about it per "
    "line, and nothing else:\n"
    "<type>; <short description>\n<relation>: <object>\n"
    "Types: " + ", ".join(ENTITY_TYPES) + ".\n"
    "Prefer these relations: " + ", ".join(PREFERRED_RELATIONS) + ".\n"
    "Write only facts the sentence supports or that are well known about this entity.\n\n"
    "Examples:\nSentence: Merkel met the French president in Paris on Monday.\nMention: Merkel\n"
    "person; German politician\noccupation: politician\n"
    "position held: Chancellor of Germany\ncountry of citizenship: Germany\n\n"
    "Sentence: Shares of Nokia fell after the phone maker cut its forecast.\nMention: Nokia\n"
    "company; Finnish telecommunications company\nindustry: telecommunications\n"
    "headquarters location: Espoo\ncountry: Finland"
)


def generation_grammar(max_triples: int) -> str:
    """The compact format as a llama.cpp GBNF grammar, for a server that constrains decoding.

    It fixes the type to the listed ones and bounds every field. Commas are not allowed in the
    description or an object: greedy decoding of a small model otherwise loops in lists
    ("actress, singer, actress, …") until the token limit. Each fact starts with its newline, so the
    answer may end after any complete fact, and never inside one."""
    types = " | ".join(f'"{t}"' for t in ENTITY_TYPES)
    return "\n".join([
        f'root ::= type "; " description fact{{1,{max_triples}}}',
        f"type ::= {types}",
        "description ::= [^\\n;,]{1,50}",
        'fact ::= "\\n" relation ": " object',
        "relation ::= [a-z] [a-z ]{1,35}",
        "object ::= [^\\n,]{1,40}",
    ]) + "\n"


RERANK_SYSTEM = (
    "You link an entity mention to a knowledge base. Reply with the QID of the right candidate only."
)
RERANK_NUMBERED_SYSTEM = (
    "You link an entity mention to a knowledge base. Reply with the number of the right candidate only."
)
RERANK_LAYOUTS = get_args(RerankLayout)

def generation_messages(sentence: str, mention: str, image_path: str | None, send_image: bool) -> list[dict]:
    user = f"Sentence: {sentence}\nMention: {mention}"
    content: str | list[dict] = user
    if send_image and image_path:
        content = [
            {"type": "text", "text": user},
            {"type": "image_url", "image_url": {"url": image_data_url(image_path)}},
        ]
    return [{"role": "system", "content": GENERATION_SYSTEM}, {"role": "user", "content": content}]


@dataclass
class CandidateCard:
    qid: str
    label: str
    description: str
    triples: list[tuple[str, str]] = field(default_factory=list)


def _short(text: str | None, limit: int) -> str:
    text = (text or "").strip() or "no description"
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _candidate_line(card: CandidateCard, max_description_chars: int) -> str:
    """`Label, description [relation: tail; ...]`, without the name the answer uses (QID or number)."""
    line = f"{card.label}, {_short(card.description, max_description_chars)}"
    if card.triples:
        line += " [" + "; ".join(f"{relation}: {tail}" for relation, tail in card.triples) + "]"
    return line


def rerank_messages(
    sentence: str,
    mention: str,
    mention_description: str | None,
    mention_triples: list[tuple[str, str]],
    candidates: list[CandidateCard],
    max_description_chars: int = 160,
    layout: str = "question_first",
) -> list[dict]:
    """`candidates` in retrieval order.

    `reference`: the candidates first, in reverse retrieval order (the retriever's first choice
    last, next to the question), then the sentence and what is known about the mention.
    `question_first`: the sentence and mention first, then the candidates in retrieval order: a
    small model leans towards the candidates it reads first, so the order should agree with retrieval
    (the two layouts compared with the packaged model: docs/results.md).
    `numbered`: as `question_first`, each candidate numbered (`1. Label, description`) and the answer its
    number: up to 9 candidates that is one token, whose log-probabilities grade every candidate.
    """
    about = [f"Mention description: {mention_description}"] if mention_description else []
    if mention_triples:
        about.append("Mention facts: " + "; ".join(f"{relation}: {tail}" for relation, tail in mention_triples))
    question = f'Which candidate is "{mention}" in this sentence?'
    cards = [f"{card.qid}: {_candidate_line(card, max_description_chars)}" for card in candidates]
    if layout == "reference":
        lines = ["Candidates:", *reversed(cards), "", f"Sentence: {sentence}", *about, question, "Answer:"]
    elif layout == "question_first":
        lines = [f"Sentence: {sentence}", *about, question, *cards, "Answer:"]
    elif layout == "numbered":
        numbered = [f"{i}. {_candidate_line(card, max_description_chars)}" for i, card in enumerate(candidates, 1)]
        lines = [f"Sentence: {sentence}", *about, question, *numbered, "Answer:"]
        return [{"role": "system", "content": RERANK_NUMBERED_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]
    else:
        raise ValueError(f"unknown rerank layout {layout!r}; choose one of {RERANK_LAYOUTS}")
    return [{"role": "system", "content": RERANK_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def rerank_requests(
    mentions: list[dict],
    candidates: dict[str, list[str]],
    entities: dict[str, dict],
    filtered: dict[tuple[str, str], list[tuple[str, str]]],
    generated: dict[str, list[tuple[str, str]]],
    descriptions: dict[str, str],
    max_description_chars: int = 160,
    layout: str = "question_first",
) -> tuple[list[tuple[str, list[dict]]], dict[str, list[tuple[str, str]]]]:
    """(mention_id, messages) per mention that has candidates, and each one's (qid, label) options
    in retrieval order, which is what the answer parser resolves QIDs and labels against."""
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
        messages = rerank_messages(
            row["sentence"], row["mention"], descriptions.get(mid), generated.get(mid, []), cards,
            max_description_chars, layout,
        )
        requests.append((mid, messages))
    return requests, options
