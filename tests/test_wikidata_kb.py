"""The `kb` stage on a small dump the test writes in Wikidata's own format, awkward cases included."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from kgmel_core.config import KBConfig
from kgmel_core.data.wikidata import ParseStats, claim_value, format_time, parse_line
from storage import ArtifactStore, RunLog
from tasks import kb as kb_tasks
from tasks.common import PipelineContext


def _label(text: str, language: str = "en") -> dict:
    return {language: {"language": language, "value": text}}


def _statement(prop: str, datavalue: dict | None = None, snaktype: str = "value", rank: str = "normal") -> dict:
    snak = {"snaktype": snaktype, "property": prop}
    if datavalue is not None:
        snak["datavalue"] = datavalue
    return {"mainsnak": snak, "type": "statement", "rank": rank}


def _item(qid: str, label: str | None, description: str | None = None, sitelinks: int = 1, claims=(), lang="en"):
    obj = {"type": "item", "id": qid, "labels": _label(label, lang) if label else {}, "claims": {}}
    if description:
        obj["descriptions"] = _label(description, lang)
    obj["sitelinks"] = {f"wiki{i}": {"site": f"wiki{i}", "title": label} for i in range(sitelinks)}
    for statement in claims:
        obj["claims"].setdefault(statement["mainsnak"]["property"], []).append(statement)
    return obj


def _entity_id(qid: str) -> dict:
    return {"type": "wikibase-entityid", "value": {"entity-type": "item", "numeric-id": int(qid[1:]), "id": qid}}


ADAMS_CLAIMS = [
    _statement("P31", _entity_id("Q5")),
    _statement("P569", {"type": "time", "value": {"time": "+1952-03-11T00:00:00Z", "precision": 11}}),
    _statement("P2048", {"type": "quantity", "value": {"amount": "+1.96", "unit": "http://www.wikidata.org/entity/Q11573"}}),
    _statement("P1477", {"type": "monolingualtext", "value": {"text": "Douglas Noël Adams", "language": "en"}}),
    _statement("P1477", {"type": "monolingualtext", "value": {"text": "Douglas Adams (fr)", "language": "fr"}}),
    _statement("P214", {"type": "string", "value": "113230702"}),
    _statement("P20", snaktype="somevalue"),
    _statement("P40", snaktype="novalue"),
    _statement("P625", {"type": "globecoordinate", "value": {"latitude": 51.5, "longitude": -0.1}}),
    _statement("P106", _entity_id("Q36180"), rank="deprecated"),
    _statement("P106", _entity_id("Q404404")),  # an item the dump does not hold: no label to resolve
]
ENTITIES = [
    _item("Q42", "Douglas Adams", "English writer and humorist", sitelinks=3, claims=ADAMS_CLAIMS),
    _item("Q5", "human", "common name of Homo sapiens", sitelinks=2),
    _item("Q11573", "metre", "SI unit of length", sitelinks=2),
    _item("Q7", "Zoë Ünicode 東京", "a name with accents and kanji", sitelinks=1,
          claims=[_statement("P31", _entity_id("Q5"))]),
    _item("Q8", None, None, sitelinks=5),  # no label at all
    _item("Q9", "Seulement français", "une description", sitelinks=4, lang="fr"),  # no English label
    {"type": "item", "id": "Q99", "missing": ""},  # deleted
    {"type": "lexeme", "id": "L1", "lemmas": {}},
    {"type": "property", "id": "P31", "labels": _label("instance of"),
     "descriptions": _label("that class of which this subject is a particular example"), "datatype": "wikibase-item"},
    {"type": "property", "id": "P569", "labels": _label("date of birth"), "datatype": "time"},
    {"type": "property", "id": "P2048", "labels": _label("height"), "datatype": "quantity"},
    {"type": "property", "id": "P1477", "labels": _label("birth name"), "datatype": "monolingualtext"},
]


def write_dump(path: Path, entities: list[dict], malformed: bool = True) -> Path:
    """The dump layout: `[`, one entity per line followed by a comma (but the last), `]`."""
    lines = [json.dumps(e, ensure_ascii=False) for e in entities]
    if malformed:
        lines.insert(3, '{"type": "item", "id": "Q666", "labels": {"en": ')  # a truncated line
    body = "[\n" + ",\n".join(lines) + "\n]\n"
    data = body.encode()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    elif path.suffix == ".bz2":
        path.write_bytes(bz2.compress(data))
    else:
        path.write_bytes(data)
    return path


def _build(tmp_path: Path, dump: Path, **config) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    store = ArtifactStore(tmp_path / "artifacts")
    ctx = PipelineContext(store, RunLog(store, "t", "test"))
    artifact = kb_tasks.kb.fn(ctx, KBConfig(dump=str(dump), **config))
    return artifact.read("entities"), artifact.read("kb_triples"), artifact.manifest["stats"]


def test_dump_becomes_entities_and_triples_with_tail_labels(tmp_path):
    entities, triples, stats = _build(tmp_path, write_dump(tmp_path / "latest-all.json", ENTITIES))
    assert entities.select("qid", "label").rows() == [
        ("Q11573", "metre"), ("Q42", "Douglas Adams"), ("Q5", "human"), ("Q7", "Zoë Ünicode 東京")
    ]
    adams = {(r["relation"], r["tail"]): r for r in triples.filter(pl.col("head_qid") == "Q42").iter_rows(named=True)}
    assert set(adams) == {
        ("instance of", "human"),
        ("date of birth", "1952-03-11"),
        ("height", "1.96 metre"),
        ("birth name", "Douglas Noël Adams"),
        ("P214", "113230702"),  # a property the dump has no entity for keeps its id
        ("P106", "Q404404"),  # an item without a label keeps its QID, counted
    }
    assert adams[("instance of", "human")]["tail_description"] == "common name of Homo sapiens"
    assert adams[("instance of", "human")]["relation_description"].startswith("that class of")
    assert stats["malformed_lines"] == 1 and "Q666" in stats["malformed_examples"][0]
    assert stats["deleted_entities"] == 1 and stats["other_entities"] == 1 and stats["tails_without_label"] == 1
    assert stats["claims_skipped"] == {
        "somevalue": 1, "novalue": 1, "globecoordinate": 1, "deprecated": 1, "monolingualtext in another language": 1
    }


def test_qid_list_and_sitelink_filters(tmp_path):
    dump = write_dump(tmp_path / "dump.json", ENTITIES)
    (tmp_path / "qids.txt").write_text("Q7\nQ9\n")
    entities, triples, _ = _build(tmp_path, dump, qids_file=str(tmp_path / "qids.txt"))
    assert entities["qid"].to_list() == ["Q7"]  # Q9 has no English label
    assert triples.rows() == [("Q7", "instance of", "that class of which this subject is a particular example",
                               "human", "common name of Homo sapiens")]
    entities, _, _ = _build(tmp_path / "b", dump, min_sitelinks=3)
    assert entities["qid"].to_list() == ["Q42"]


@pytest.mark.parametrize("suffix", [".json.gz", ".json.bz2"])
def test_compressed_dumps_and_partitions_give_the_same_tables(tmp_path, suffix):
    plain = _build(tmp_path / "plain", write_dump(tmp_path / "dump.json", ENTITIES))
    packed = _build(tmp_path / "packed", write_dump(tmp_path / f"dump{suffix}", ENTITIES))
    split = _build(tmp_path / "split", tmp_path / "dump.json", partitions=3)
    for other in (packed, split):
        assert other[0].equals(plain[0]) and other[1].equals(plain[1])
    assert split[2]["partitions"] == 3 and split[2]["lines"] == plain[2]["lines"]


def test_values_and_lines_unit():
    assert format_time({"time": "+1952-03-11T00:00:00Z", "precision": 11}) == "1952-03-11"
    assert format_time({"time": "+1952-03-00T00:00:00Z", "precision": 10}) == "1952-03"
    assert format_time({"time": "-0427-00-00T00:00:00Z", "precision": 9}) == "-427"
    claim, why = claim_value({"snaktype": "value", "property": "P1", "datavalue": {"type": "url", "value": "x"}}, "en")
    assert claim is None and why == "url"
    stats = ParseStats()
    assert parse_line(b"[\n", stats) is None and parse_line(b'{"id": "Q1"},\n', stats) == {"id": "Q1"}
    assert parse_line(b"[1, 2],\n", stats) is None and stats.malformed == 1 and stats.lines == 2


@pytest.mark.slow
def test_kgmel_kb_build_on_a_dask_local_cluster_matches_the_in_process_stage(tmp_path):
    """The operator's command, end to end: `kgmel kb build` with `runner: dask` (a real LocalCluster of 2
    worker processes parsing 3 byte ranges) writes the same tables as the stage run in this process."""
    import subprocess
    import sys

    import yaml

    dump = write_dump(tmp_path / "latest-all.json", ENTITIES)
    local = _build(tmp_path / "local", dump)
    config = tmp_path / "kb.yaml"
    config.write_text(yaml.safe_dump({
        "artifacts": str(tmp_path / "artifacts"), "runner": "dask", "dask": {"n_workers": 2, "threads_per_worker": 1},
        "kb": {"partitions": 3},
    }))
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "kb", "build", "--config", str(config), "--dump", str(dump)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Creating a new Dask cluster with `distributed.deploy.local.LocalCluster`" in done.stdout + done.stderr
    store = ArtifactStore(tmp_path / "artifacts")
    [key] = store.keys("kb")
    built = store.require("kb", key)
    assert built.read("entities").equals(local[0]) and built.read("kb_triples").equals(local[1])
    assert built.manifest["stats"]["partitions"] == 3 and built.manifest["stats"]["lines"] == local[2]["lines"]
