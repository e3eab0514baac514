"""`bench.link_scale` links against a scratch copy of a real store: it must never write into the source."""

import os

from bench.link_scale import scratch_store


def test_the_scratch_store_links_artifacts_and_copies_what_a_run_edits_in_place(tmp_path):
    source = tmp_path / "store"
    for relative in ("index/k/part-0.parquet", "kgmel.duckdb", "_llm_cache/cache.db", "_embedding_cache/t/a.parquet"):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_text(relative)
    scratch_store(source, tmp_path / "cold", cold=True)

    def same(relative: str) -> bool:
        return os.path.samefile(source / relative, tmp_path / "cold" / relative)

    assert same("index/k/part-0.parquet")
    assert not same("kgmel.duckdb") and not same("_llm_cache/cache.db")
    assert (tmp_path / "cold" / "kgmel.duckdb").read_text() == "kgmel.duckdb"
    assert not (tmp_path / "cold" / "_embedding_cache").exists()
    scratch_store(source, tmp_path / "warm", cold=False)
    assert os.path.samefile(source / "_embedding_cache/t/a.parquet", tmp_path / "warm/_embedding_cache/t/a.parquet")
