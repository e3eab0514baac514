"""A seeded synthetic dataset in the MIMIC layout, built so that each modality matters.

Entities come in ambiguity groups that share one label. Inside a group, two entities have the
same type (so label + description cannot tell them apart) and one has another type. Each mention
sentence carries one kind of cue, chosen at random:
- `type`:  "the city of X"          -> the head text separates the odd-type entity only;
- `fact`:  "X, a painter from Peru" -> only the entity's KB triples hold those facts;
- `none`:  "X was in the news"      -> only the image resolves it.
Entity images show what the entity is and where: shape = type, background colour = country.
The two same-type entities of a group have different countries half of the time (then the
picture separates them) and the same country otherwise (then they differ in their first fact,
e.g. occupation, which only the KB triples hold). A mention image is a jittered, noisy copy of
its entity's image; some mentions have none, so then text and triples must do the work.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

TYPES: dict[str, dict] = {
    "person": {
        "shape": "circle",
        "description": "a person",
        "phrase": "the person {m}",
        "color": (200, 170, 140),
        "relations": {
            "occupation": [
                "painter",
                "chemist",
                "footballer",
                "senator",
                "novelist",
                "violinist",
                "architect",
                "astronaut",
            ],
            "country of citizenship": None,
        },
        "fact": "{m}, a {occupation} from {country of citizenship},",
    },
    "city": {
        "shape": "square",
        "description": "a city",
        "phrase": "the city of {m}",
        "color": (120, 160, 200),
        "relations": {
            "country": None,
            "located in": ["the north", "the south", "the coast", "the mountains", "the valley", "the delta"],
        },
        "fact": "{m}, a city in {located in} of {country},",
    },
    "river": {
        "shape": "bar",
        "description": "a river",
        "phrase": "the river {m}",
        "color": (90, 200, 190),
        "relations": {
            "country": None,
            "mouth of the watercourse": ["the Atlantic", "the Pacific", "a lake", "the Black Sea", "the Baltic"],
        },
        "fact": "{m}, a river of {country} that flows into {mouth of the watercourse},",
    },
    "band": {
        "shape": "diamond",
        "description": "a music band",
        "phrase": "the band {m}",
        "color": (190, 110, 190),
        "relations": {
            "genre": ["jazz", "punk rock", "folk", "techno", "heavy metal", "reggae"],
            "country of origin": None,
        },
        "fact": "{m}, a {genre} band from {country of origin},",
    },
    "company": {
        "shape": "triangle",
        "description": "a company",
        "phrase": "the company {m}",
        "color": (210, 200, 100),
        "relations": {
            "industry": ["banking", "shipbuilding", "software", "mining", "aviation", "retail"],
            "headquarters location": None,
        },
        "fact": "{m}, a {industry} firm based in {headquarters location},",
    },
    "ship": {
        "shape": "cross",
        "description": "a ship",
        "phrase": "the ship {m}",
        "color": (150, 150, 150),
        "relations": {
            "operator": ["the navy", "a ferry line", "a cruise line", "a fishing fleet"],
            "country of registry": None,
        },
        "fact": "{m}, a vessel of {operator} registered in {country of registry},",
    },
}
COUNTRIES = [
    "Peru",
    "Norway",
    "Kenya",
    "Japan",
    "Chile",
    "Poland",
    "Egypt",
    "Canada",
    "Italy",
    "Vietnam",
    "Ghana",
    "Finland",
]
# Each country has a colour, so a picture shows facts the text may not mention.
COUNTRY_COLORS = [
    (230, 40, 40),
    (40, 40, 230),
    (30, 150, 30),
    (250, 250, 250),
    (20, 20, 20),
    (250, 140, 0),
    (120, 0, 160),
    (0, 200, 230),
    (140, 80, 20),
    (255, 120, 200),
    (128, 128, 0),
    (0, 90, 90),
]
SYLLABLES = [
    "al",
    "bar",
    "cor",
    "den",
    "el",
    "fa",
    "gor",
    "hal",
    "ir",
    "jun",
    "ka",
    "lo",
    "mar",
    "nor",
    "os",
    "pel",
    "qu",
    "ran",
    "sil",
    "tor",
    "ul",
    "ver",
    "wen",
    "xan",
    "yo",
    "zel",
]
NEUTRAL = [
    "{m} was in the news this week.",
    "A photo of {m} taken last spring.",
    "People talked about {m} again.",
    "Here is {m}, as seen in the picture.",
    "Reports about {m} appeared on Monday.",
]
TYPE_TEMPLATES = [
    "A new report on {phrase} came out today.",
    "Visitors remember {phrase} fondly.",
    "This picture shows {phrase}.",
]
FACT_TEMPLATES = [
    "{fact} made headlines today.",
    "Yesterday {fact} was in the spotlight.",
    "Reports say that {fact} drew attention.",
]
IMAGE_SIZE = 32


@dataclass(frozen=True)
class DemoSpec:
    groups: int = 100
    distractors: int = 40  # entities no mention refers to: the KB is larger than the mentions
    mentions_per_entity: tuple[int, int] = (1, 3)
    missing_image_rate: float = 0.15
    seed: int = 0


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3]))).capitalize()
        if name not in used:
            used.add(name)
            return name


def _draw(path: Path, background, shape: str, color, rng: random.Random | None) -> None:
    """Draw an entity's picture; with rng, a jittered noisy copy (a mention's photo of it)."""
    size = IMAGE_SIZE
    bg = tuple(max(0, min(255, c + (rng.randint(-20, 20) if rng else 0))) for c in background)
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    dx, dy = (rng.randint(-4, 4), rng.randint(-4, 4)) if rng else (0, 0)
    s = (rng.randint(-2, 2) if rng else 0) + 9
    cx, cy = size // 2 + dx, size // 2 + dy
    box = [cx - s, cy - s, cx + s, cy + s]
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=color)
    elif shape == "cross":
        draw.rectangle([cx - s, cy - 3, cx + s, cy + 3], fill=color)
        draw.rectangle([cx - 3, cy - s, cx + 3, cy + s], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - s), (cx - s, cy), (cx, cy + s), (cx + s, cy)], fill=color)
    else:
        draw.rectangle([cx - s, cy - 4, cx + s, cy + 4], fill=color)
    if rng:
        pixels = image.load()
        for _ in range(60):
            x, y = rng.randrange(size), rng.randrange(size)
            pixels[x, y] = tuple(rng.randrange(256) for _ in range(3))
    image.save(path, format="PNG")


def generate_demo_dataset(root: str | Path, spec: DemoSpec = DemoSpec()) -> dict[str, int]:
    """Write the demo dataset under root (MIMIC layout); returns counts. Same seed -> same bytes."""
    rng = random.Random(spec.seed)
    root = Path(root)
    (root / "mention_images").mkdir(parents=True, exist_ok=True)
    (root / "kb" / "images").mkdir(parents=True, exist_ok=True)
    used_names: set[str] = set()
    type_names = sorted(TYPES)
    entities, triples, sentences = {}, [], []
    next_qid = 1000
    visuals: dict[str, tuple] = {}

    def new_entity(label: str, type_name: str, like: dict[str, str] | None = None, same_country: bool = False) -> str:
        """A new entity; with `like`, a same-type sibling that shares its country (and then differs
        in the first fact) or differs in country."""
        nonlocal next_qid
        qid = f"Q{next_qid}"
        next_qid += 1
        info = TYPES[type_name]
        country_relation = next(r for r, v in info["relations"].items() if v is None)
        first_relation = next(r for r, v in info["relations"].items() if v)
        while True:
            facts = {r: rng.choice(v if v else COUNTRIES) for r, v in info["relations"].items()}
            if like is None:
                break
            if same_country:
                facts[country_relation] = like[country_relation]
                if facts[first_relation] != like[first_relation]:
                    break
            elif facts[country_relation] != like[country_relation]:
                break
        background = COUNTRY_COLORS[COUNTRIES.index(facts[country_relation])]
        visuals[qid] = (background, info["shape"], info["color"])
        _draw(root / "kb" / "images" / f"{qid}.png", *visuals[qid], None)
        entities[qid] = {
            "label": label,
            "description": info["description"],
            "image": f"{qid}.png",
            "type": type_name,
            "facts": facts,
        }
        triples.append((qid, "P31", "instance of", type_name))
        for relation, value in facts.items():
            triples.append((qid, None, relation, value))
        return qid

    groups = []
    for _ in range(spec.groups):
        label = _name(rng, used_names)
        shared_type, odd_type = rng.sample(type_names, 2)
        first = new_entity(label, shared_type)
        second = new_entity(label, shared_type, like=entities[first]["facts"], same_country=rng.random() < 0.5)
        groups.append([first, second, new_entity(label, odd_type)])
    for _ in range(spec.distractors):
        new_entity(_name(rng, used_names), rng.choice(type_names))

    sentence_id = 0
    for group in groups:
        for qid in group:
            entity = entities[qid]
            for _ in range(rng.randint(*spec.mentions_per_entity)):
                cue = rng.choice(["type", "fact", "none"])
                m = entity["label"]
                info = TYPES[entity["type"]]
                if cue == "type":
                    text = rng.choice(TYPE_TEMPLATES).format(phrase=info["phrase"].format(m=m))
                elif cue == "fact":
                    fact = info["fact"].format(m=m, **entity["facts"])
                    text = rng.choice(FACT_TEMPLATES).format(fact=fact)
                    text = text[0].upper() + text[1:]
                else:
                    text = rng.choice(NEUTRAL).format(m=m)
                image_name = f"m{sentence_id}.png"
                if rng.random() >= spec.missing_image_rate:
                    _draw(root / "mention_images" / image_name, *visuals[qid], rng)
                sentences.append(
                    {
                        "id": sentence_id,
                        "sentence": text,
                        "imgPath": image_name,
                        "mention": [m],
                        "entity": [m],
                        "answer": [qid],
                        "cue": cue,
                    }
                )
                sentence_id += 1

    order = list(range(len(sentences)))
    rng.shuffle(order)
    n = len(order)
    cut_train, cut_val = int(0.6 * n), int(0.8 * n)
    splits = {
        "train": sorted(order[:cut_train]),
        "val": sorted(order[cut_train:cut_val]),
        "test": sorted(order[cut_val:]),
    }
    (root / "DemoMEL.json").write_text(json.dumps(sentences, indent=1))
    (root / "splits.json").write_text(json.dumps(splits))
    kb = {qid: {k: v for k, v in e.items() if k in ("label", "description", "image")} for qid, e in entities.items()}
    (root / "kb" / "entities.json").write_text(json.dumps(kb, indent=1))
    with open(root / "kb" / "triples.tsv", "w") as handle:
        for head, pid, relation, tail in triples:
            handle.write(f"{head}\t{pid or relation}\t{tail}\n")
    (root / "PID2Label.tsv").write_text("P31\tinstance of\tthat class of which this subject is a particular example\n")
    _write_new_mentions(root / "new", groups, entities, visuals, random.Random(spec.seed + 1))
    return {"entities": len(entities), "mentions": len(sentences), "kb_triples": len(triples)}


def _write_new_mentions(
    folder: Path, groups: list[list[str]], entities: dict, visuals: dict, rng: random.Random
) -> None:
    """`new/mentions.json` (+ `new/images/`): unseen sentences about KB entities, without answers, for
    trying `kgmel link new/mentions.json --image-dir new/images` on the demo."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, qid in enumerate(rng.sample([q for group in groups for q in group], min(6, 3 * len(groups)))):
        entity = entities[qid]
        fact = TYPES[entity["type"]]["fact"].format(m=entity["label"], **entity["facts"])
        _draw(folder / "images" / f"new{i}.png", *visuals[qid], rng)
        records.append({"id": f"new{i}", "sentence": f"Yesterday {fact} was in the news again.",
                        "mention": [entity["label"]], "imgPath": f"new{i}.png"})
    (folder / "mentions.json").write_text(json.dumps(records, indent=1))
