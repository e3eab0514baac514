"""Wikidata dump parsing: entities/s and peak memory of the `kb` stage on a dump generated on the fly.

    python -m bench.kb_dump [--entities 1000000] [--partitions 1 2]

The dump (Wikidata's own layout, like tests/test_wikidata_kb.py writes it: one entity per line with
labels, descriptions, sitelinks and item/time/quantity/string claims) is written to a temporary file,
then built into a KB by the real stage (both passes and the DuckDB join). Peak memory is the
process's maximum resident set size, so run one configuration per process for a clean number.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

from kgmel_core.config import KBConfig
from storage import ArtifactStore, RunLog
from tasks import kb as kb_tasks
from tasks.common import PipelineContext

PROPERTIES = {"P31": "instance of", "P106": "occupation", "P27": "country of citizenship", "P569": "date of birth",
              "P2048": "height", "P1477": "birth name"}


def entity(i: int, n: int, rng: random.Random) -> dict:
    def item(qid: int) -> dict:
        return {"type": "wikibase-entityid", "value": {"entity-type": "item", "numeric-id": qid, "id": f"Q{qid}"}}

    def statement(prop: str, value: dict) -> dict:
        return {"mainsnak": {"snaktype": "value", "property": prop, "datavalue": value}, "type": "statement",
                "rank": "normal"}

    claims = {
        "P31": [statement("P31", item(5))],
        "P106": [statement("P106", item(rng.randrange(1, n))) for _ in range(rng.randint(0, 3))],
        "P27": [statement("P27", item(rng.randrange(1, n)))],
        "P569": [statement("P569", {"type": "time", "value": {"time": f"+{1800 + i % 200}-01-0{1 + i % 9}T00:00:00Z",
                                                                "precision": 11}})],
        "P2048": [statement("P2048", {"type": "quantity", "value": {"amount": f"+1.{i % 99}",
                                                                     "unit": "http://www.wikidata.org/entity/Q11573"}})],
        "P1477": [statement("P1477", {"type": "monolingualtext", "value": {"text": f"Name {i}", "language": "en"}})],
    }
    return {"type": "item", "id": f"Q{i}", "labels": {"en": {"language": "en", "value": f"Entity {i}"}},
            "descriptions": {"en": {"language": "en", "value": f"synthetic entity number {i}"}},
            "sitelinks": {f"wiki{k}": {"site": f"wiki{k}", "title": str(i)} for k in range(i % 4)}, "claims": claims}


def write_dump(path: Path, n: int) -> int:
    rng = random.Random(0)
    with open(path, "w") as out:
        out.write("[\n")
        for pid, label in PROPERTIES.items():
            out.write(json.dumps({"type": "property", "id": pid, "labels": {"en": {"value": label}}}) + ",\n")
        for i in range(1, n + 1):
            out.write(json.dumps(entity(i, n, rng)) + (",\n" if i < n else "\n"))
        out.write("]\n")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--min-sitelinks", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "latest-all.json"
        started = time.perf_counter()
        size = write_dump(dump, args.entities)
        print(f"generated {args.entities} entities ({size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s")
        store = ArtifactStore(Path(tmp) / "artifacts")
        ctx = PipelineContext(store, RunLog(store, "bench", "bench"))
        started = time.perf_counter()
        built = kb_tasks.kb.fn(ctx, KBConfig(dump=str(dump), min_sitelinks=args.min_sitelinks,
                                             partitions=args.partitions))
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print("| entities in dump | partitions | kept entities | triples | seconds | entities/s | peak RSS GB |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {args.entities} | {args.partitions} | {built.tables['entities']} | {built.tables['kb_triples']} | "
              f"{seconds:.0f} | {args.entities / seconds:,.0f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
