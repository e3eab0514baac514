import hashlib
import json
from pathlib import Path

import pytest
from conftest import SHARED, SMALL_DEMO

from kgmel_core.data.datasets import DatasetError, DatasetLayout, InputLimits, read_dataset
from kgmel_core.data.demo_data import DemoSpec, generate_demo_dataset


def _dataset(tmp_path: Path, records, splits=None, entities=None, triples=None) -> DatasetLayout:
    (tmp_path / "Mini.json").write_text(json.dumps(records))
    (tmp_path / "splits.json").write_text(json.dumps(splits or {"train": [r.get("id") for r in records]}))
    if entities is not None:
        (tmp_path / "kb").mkdir()
        (tmp_path / "kb" / "entities.json").write_text(json.dumps(entities))
        if triples is not None:
            (tmp_path / "kb" / "triples.tsv").write_text(triples)
    return DatasetLayout(tmp_path)


GOOD = {
    "id": 7,
    "sentence": "Obama spoke.",
    "mention": ["Obama"],
    "entity": ["Barack Obama"],
    "answer": ["Q76"],
    "imgPath": "7.jpg",
}


def test_reads_good_record_and_counts_missing_image(tmp_path):
    ds = read_dataset(_dataset(tmp_path, [GOOD]))
    row = ds.mentions.row(0, named=True)
    assert row["mention_id"] == "7-0" and row["gold_qid"] == "Q76" and row["image_path"] is None
    assert ds.stats["mentions_without_image"] == 1 and ds.stats["kb_source"] == "gold_answers"
    assert ds.entities["label"].to_list() == ["Barack Obama"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mention": "Obama"}, r"record 0 \(id=7\): field 'mention' must be a list"),
        ({"answer": ["Q76", "Q1"]}, r"record 0 \(id=7\): fields 'mention', 'entity', 'answer' must have equal"),
        ({"answer": ["obama"]}, r"record 0 \(id=7\): field 'answer\[0\]' must be a Wikidata QID"),
        ({"sentence": ""}, r"record 0 \(id=7\): field 'sentence' must be a non-empty string"),
        ({"mention": [""]}, r"field 'mention\[0\]' must be a non-empty string"),
    ],
)
def test_malformed_record_names_file_record_and_field(tmp_path, change, message):
    with pytest.raises(DatasetError, match=message) as info:
        read_dataset(_dataset(tmp_path, [{**GOOD, **change}]))
    assert "Mini.json" in str(info.value)


def test_missing_id_and_duplicates(tmp_path):
    record = {k: v for k, v in GOOD.items() if k != "id"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DatasetError, match="record 0: missing field 'id'"):
        read_dataset(_dataset(tmp_path / "a", [record], {"train": []}))
    with pytest.raises(DatasetError, match=r"record 1 \(id=7\): duplicate field 'id'"):
        read_dataset(_dataset(tmp_path / "b", [GOOD, GOOD]))


def test_split_conflicts_go_to_evaluation_split_and_are_counted(tmp_path):
    other = {**GOOD, "id": 8}
    ds = read_dataset(_dataset(tmp_path, [GOOD, other], {"train": [7, 8], "val": [8]}))
    assert dict(zip(ds.mentions["sentence_id"], ds.mentions["split"], strict=True)) == {"7": "train", "8": "val"}
    assert ds.stats["ids_in_several_splits"] == 1


def test_unknown_split_name_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="unknown split names"):
        read_dataset(_dataset(tmp_path, [GOOD], {"dev": [7]}))


def test_sentences_without_split_are_counted(tmp_path):
    ds = read_dataset(_dataset(tmp_path, [GOOD, {**GOOD, "id": 9}], {"train": [7]}))
    assert ds.mentions.height == 1 and ds.stats["sentences_without_split"] == 1


def test_kb_entities_and_triples(tmp_path):
    ds = read_dataset(
        _dataset(
            tmp_path,
            [GOOD],
            entities={"Q76": {"label": "Barack Obama", "description": "president"}},
            triples="Q76\tP39\tPresident of the United States\nQ99\tP31\thuman\n",
        )
    )
    assert ds.kb_triples.rows() == [("Q76", "P39", None, "President of the United States", None)]
    assert ds.stats["kb_triples_unknown_head"] == 1 and ds.stats["entities_without_image"] == 1


def test_bad_entity_and_bad_triple_line(tmp_path):
    with pytest.raises(DatasetError, match=r"entity 0: field 'qid' must be a Wikidata QID"):
        read_dataset(_dataset(tmp_path, [GOOD], entities=[{"qid": "x", "label": "X"}]))
    (tmp_path / "b").mkdir()
    with pytest.raises(DatasetError, match=r"entity 0 \(qid=Q76\): field 'label'"):
        read_dataset(_dataset(tmp_path / "b", [GOOD], entities={"Q76": {"description": "no label"}}))
    (tmp_path / "c").mkdir()
    with pytest.raises(DatasetError, match="line 2: bad triple"):
        read_dataset(
            _dataset(
                tmp_path / "c",
                [GOOD],
                entities={"Q76": {"label": "Obama"}},
                triples="Q76\tP31\thuman\nnot-a-qid\tP31\thuman\n",
            )
        )


def test_invalid_json_is_named(tmp_path):
    (tmp_path / "Mini.json").write_text("[{")
    (tmp_path / "splits.json").write_text("{}")
    with pytest.raises(DatasetError, match="Mini.json: not valid JSON"):
        read_dataset(DatasetLayout(tmp_path))


@pytest.mark.skipif(not (SHARED / "data" / "wikidiverse").is_dir(), reason="shared WikiDiverse sample not present")
def test_reads_shared_wikidiverse_sample():
    ds = read_dataset(DatasetLayout(SHARED / "data" / "wikidiverse"))
    assert ds.stats["mentions"] == ds.mentions.height > 10_000
    assert ds.stats["mentions_without_image"] == ds.mentions.height  # images are not shipped
    assert ds.stats["ids_in_several_splits"] == 8
    assert set(ds.mentions["split"].unique()) == {"train", "val"}


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_demo_data_is_deterministic_and_seed_dependent(tmp_path):
    generate_demo_dataset(tmp_path / "a", SMALL_DEMO)
    generate_demo_dataset(tmp_path / "b", SMALL_DEMO)
    generate_demo_dataset(
        tmp_path / "c", DemoSpec(groups=SMALL_DEMO.groups, distractors=SMALL_DEMO.distractors, seed=99)
    )
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_demo_data_reads_back_with_ambiguous_labels(small_demo):
    ds = read_dataset(DatasetLayout(small_demo))
    assert ds.stats["gold_missing_from_kb"] == 0 and ds.stats["kb_source"] == "kb_file"
    assert set(ds.mentions["split"].unique()) == {"train", "val", "test"}
    labels = ds.entities.group_by("label").len()
    assert labels.filter(labels["len"] == 3).height == SMALL_DEMO.groups  # every group shares one label
    assert 0 < ds.stats["mentions_without_image"] < ds.mentions.height


def test_unusable_images_count_as_no_image_and_are_named(tmp_path, small_demo):
    images = tmp_path / "mention_images"
    images.mkdir()
    good = next((small_demo / "mention_images").glob("*.png"))
    (images / "good.png").write_bytes(good.read_bytes())
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image at all")
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 10, 10)).save(images / "full.jpg", quality=90)
    (images / "truncated.jpg").write_bytes((images / "full.jpg").read_bytes()[:300])
    records = [{**GOOD, "id": i, "imgPath": name} for i, name in enumerate(
        ["good.png", "empty.jpg", "text.jpg", "truncated.jpg", "absent.jpg"]
    )]
    ds = read_dataset(_dataset(tmp_path, records))
    with_image = ds.mentions.filter(ds.mentions["image_path"].is_not_null())["image_path"].to_list()
    assert [Path(p).name for p in with_image] == ["good.png"]
    assert ds.stats["mentions_without_image"] == 4 and ds.stats["bad_mention_images"] == 3
    named = {Path(e["file"]).name: e["record"] for e in ds.stats["bad_mention_image_examples"]}
    assert named == {
        "empty.jpg": "Mini.json: record 1 (id=1)",
        "text.jpg": "Mini.json: record 2 (id=2)",
        "truncated.jpg": "Mini.json: record 3 (id=3)",
    }
    reasons = {Path(e["file"]).name: e["reason"] for e in ds.stats["bad_mention_image_examples"]}
    assert "BytesIO" not in str(reasons) and "text.jpg" in reasons["text.jpg"]  # the file, not PIL's buffer


def test_bad_records_fail_by_default_and_skip_files_each_one_in_rejected(tmp_path):
    records = [GOOD, {**GOOD, "id": 8, "mention": ["\n\n"]}, {**GOOD, "id": 9, "answer": ["nil"]}]
    entities = [{"qid": "Q76", "label": "Barack Obama"}, {"qid": "Q77", "label": ""}]
    layout = _dataset(tmp_path, records, entities=entities, triples="Q76\toccupation\tlawyer\nQ76\t\tx\n")
    with pytest.raises(DatasetError, match=r"record 1 \(id=8\): field 'mention\[0\]'"):
        read_dataset(layout)
    ds = read_dataset(layout, bad_records="skip")
    assert ds.mentions["mention_id"].to_list() == ["7-0"] and ds.kb_triples.height == 1
    assert ds.stats["rejected_records"] == 4
    rejected = ds.rejected.select("file", "record", "record_id", "field").rows()
    assert rejected == [
        ("Mini.json", "1", "8", "mention[0]"),
        ("Mini.json", "2", "9", "answer[0]"),
        ("entities.json", "1", "Q77", "label"),
        ("triples.tsv", "2", "Q76", "relation"),
    ]
    assert ds.rejected["reason"].str.contains("must be a non-empty string").sum() == 2


def test_a_qid_repeated_in_the_dict_form_is_refused_or_rejected_never_overwritten(tmp_path):
    layout = _dataset(tmp_path, [GOOD], entities={})
    (tmp_path / "kb" / "entities.json").write_text(  # JSON keeps the last of two equal keys, silently
        '{"Q76": {"label": "Barack Obama", "description": "president"}, "Q76": {"label": "Impostor"}}'
    )
    with pytest.raises(DatasetError, match=r"entities.json: entity 1 \(qid=Q76\): duplicate field 'qid'"):
        read_dataset(layout)
    ds = read_dataset(layout, bad_records="skip")
    assert ds.entities.select("qid", "label", "description").rows() == [("Q76", "Barack Obama", "president")]
    assert ds.rejected.select("file", "record", "record_id", "field").rows() == [("entities.json", "1", "Q76", "qid")]


def test_a_field_repeated_inside_a_record_or_entity_or_splits_is_refused(tmp_path):
    for name, text, message in (
        ("Mini.json", '[{"id": 7, "sentence": "Obama spoke.", "sentence": "Other.", "mention": ["Obama"], '
                      '"entity": ["Barack Obama"], "answer": ["Q76"]}]',
         r"record 0 \(id=7\): field 'sentence' appears more than once"),
        ("kb/entities.json", '{"Q76": {"label": "Barack Obama", "label": "Impostor"}}',
         r"entity 0 \(qid=Q76\): field 'label' appears more than once"),
        ("splits.json", '{"train": [7], "train": []}', "split 'train' is listed more than once"),
    ):
        folder = tmp_path / name.replace("/", "_")
        folder.mkdir()
        _dataset(folder, [GOOD], entities={"Q76": {"label": "Barack Obama"}})
        (folder / name).write_text(text)
        with pytest.raises(DatasetError, match=message):
            read_dataset(DatasetLayout(folder))


def test_mentions_missing_from_their_sentence_are_kept_counted_and_named(tmp_path):
    records = [GOOD, {**GOOD, "id": 8, "mention": ["Hermann Beckerath"], "sentence": "Hermann von Beckerath."}]
    ds = read_dataset(_dataset(tmp_path, records))
    assert ds.mentions.height == 2  # benchmarks normalise surfaces: such a mention is still linkable
    assert ds.stats["mentions_not_in_sentence"] == 1
    [example] = ds.stats["mentions_not_in_sentence_examples"]
    assert example == "Mini.json: record 1 (id=8): mention[0] 'Hermann Beckerath'"


def test_a_link_request_without_mentions_fails_in_ingest_naming_it(tmp_path):
    """Not an empty artifact that embed later rejects with "list_size needs to be a strict positive integer"."""
    from storage import ArtifactStore, RunLog
    from tasks.common import PipelineContext, StageFailed
    from tasks.ingest import ingest_link_mentions

    store = ArtifactStore(tmp_path / "artifacts")
    ctx = PipelineContext(store, RunLog(store, "t", "test"))
    with pytest.raises(StageFailed, match=r"DatasetError: records: no mentions to link \(0 sentence records\)"):
        ingest_link_mentions.fn(ctx, InputLimits(), records=[])
    assert store.keys("ingest_link") == []  # nothing published


def test_a_file_with_more_mentions_than_max_mentions_is_refused_before_any_row_is_built(tmp_path):
    from kgmel_core.data.datasets import read_mentions

    records = [{**GOOD, "id": i, "mention": ["Obama", "Obama"], "entity": ["a", "b"], "answer": ["Q76", "Q76"]}
               for i in range(3)]
    layout = _dataset(tmp_path, records)
    assert read_dataset(layout, limits=InputLimits(max_mentions=6)).mentions.height == 6
    with pytest.raises(DatasetError, match=r"Mini.json: 6 mentions, over dataset.max_mentions=5"):
        read_dataset(layout, bad_records="skip", limits=InputLimits(max_mentions=5))  # the file, not a record
    with pytest.raises(DatasetError, match=r"<records>: 6 mentions, over dataset.max_mentions=5"):
        read_mentions(None, None, None, records=records, require_gold=False, limits=InputLimits(max_mentions=5))


def test_an_image_over_max_image_pixels_counts_as_no_image_without_being_decoded(tmp_path):
    from PIL import Image

    images = tmp_path / "mention_images"
    images.mkdir()
    Image.new("RGB", (40, 30)).save(images / "small.png")
    Image.new("RGB", (50, 30)).save(images / "large.png")  # 1,500 pixels
    records = [{**GOOD, "id": i, "imgPath": name} for i, name in enumerate(["small.png", "large.png"])]
    ds = read_dataset(_dataset(tmp_path, records), limits=InputLimits(max_image_pixels=1200))
    assert [Path(p).name for p in ds.mentions["image_path"].drop_nulls()] == ["small.png"]
    assert ds.stats["mention_images_over_max_pixels"] == 1 and ds.stats["bad_mention_images"] == 1
    [example] = ds.stats["bad_mention_image_examples"]
    assert example["record"] == "Mini.json: record 1 (id=1)"
    assert "50x30 pixels, over dataset.max_image_pixels=1,200" in example["reason"]
    assert read_dataset(_dataset(tmp_path, records)).stats["mention_images_over_max_pixels"] == 0  # the default


def test_the_input_limits_are_the_dataset_settings():
    from kgmel_core.config import DatasetConfig

    config = DatasetConfig(max_sentence_chars=300, max_mentions=9, max_image_pixels=100)
    assert InputLimits.of(config) == InputLimits(max_sentence_chars=300, max_mentions=9, max_image_pixels=100)
    assert InputLimits() == InputLimits.of(DatasetConfig())


@pytest.mark.parametrize(("triples", "line", "message"), [
    # a ragged line: polars alone would say "found more fields than defined in 'Schema'", naming nothing
    ("Q76\tP31\thuman\nQ76\tP39\tPresident\textra\nQ76\tP69\tHarvard\n", "2",
     r"triples.tsv: line 2: expected 3 tab-separated fields .* found 4"),
    # a repeated fact would count twice in every triple stage
    ("Q76\tP31\thuman\nQ76\tP69\tHarvard\nQ76\tP31\thuman\n", "3",
     r"triples.tsv: line 3: duplicate of line 1 \(Q76, P31, human\)"),
])
def test_a_bad_triples_line_is_named_by_line_and_rejected_under_skip(tmp_path, triples, line, message):
    layout = _dataset(tmp_path, [GOOD], entities={"Q76": {"label": "Obama"}}, triples=triples)
    with pytest.raises(DatasetError, match=message):
        read_dataset(layout)
    ds = read_dataset(layout, bad_records="skip")
    assert ds.kb_triples.select("relation", "tail").rows() == [("P31", "human"), ("P69", "Harvard")]
    assert ds.rejected.select("file", "record", "field").rows() == [("triples.tsv", line, "line")]


def test_a_huge_sentence_is_cut_to_a_window_around_its_mention_and_counted(tmp_path):
    filler = "word " * 200_000  # a 1 MB "sentence"
    record = {**GOOD, "sentence": f"{filler}Obama spoke in Berlin. {filler}"}
    ds = read_dataset(_dataset(tmp_path, [record]), limits=InputLimits(max_sentence_chars=1000))
    [sentence] = ds.mentions["sentence"].to_list()
    assert len(sentence) == 1000 and "Obama spoke in Berlin." in sentence
    assert ds.stats["sentences_cut"] == 1 and ds.stats["mentions_not_in_sentence"] == 0


@pytest.mark.parametrize(("sentence", "expected"), [
    ("abcdefghij", "abcdefghij"),  # short enough: untouched
    ("0123456789MENTION0123456789", "89MENTION0"),  # centred on the mention
    ("MENTION0123456789", "MENTION012"),  # at the start
    ("0123456789MENTION", "789MENTION"),  # at the end: the last max_chars
    ("no such words here", "no such wo"),  # absent: the start
])
def test_sentence_window(sentence, expected):
    from kgmel_core.data.datasets import sentence_window

    assert sentence_window(sentence, "mention", 10) == expected


def test_the_run_summary_notes_every_lossy_read_of_an_ingest_stage():
    from types import SimpleNamespace

    from flows.summary import skip_warnings
    from storage.runs import StageRecord

    stats = {"sentences_cut": 2, "max_sentence_chars": 300, "mention_images_over_max_pixels": 3,
             "entity_images_over_max_pixels": 0, "mentions": 9}
    store = SimpleNamespace(require=lambda stage, key: SimpleNamespace(manifest={"stats": stats}))
    notes = skip_warnings(store, [StageRecord("ingest", "k", False, 9, 0.1)])
    assert notes == [
        "NOTE ingest: 2 sentences longer than dataset.max_sentence_chars=300 were cut to a window around their "
        "first mention",
        "NOTE ingest: 3 mention images larger than dataset.max_image_pixels count as no image (named in the "
        "stage's stats)",
    ]
