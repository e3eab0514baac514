"""Beyond one machine, with the real components started here: the full pipeline on a Dask LocalCluster of
two worker processes, and on an S3-compatible server (moto's, on 127.0.0.1, as s3fs's own tests use),
each compared with the single-process, local-disk run."""

from __future__ import annotations

import socket

import numpy as np
import polars as pl
import pytest
from conftest import small_config

from flows.pipeline import full_pipeline, on_runner
from storage import ArtifactStore, Catalog
from storage.fs import StoreFS

pytestmark = pytest.mark.slow
DETERMINISTIC = [("ingest", "mentions"), ("ingest", "entities"), ("ingest", "kb_triples"),
                 ("train", "training_history")]


def _tables(result, label: str, table: str, options=None) -> pl.DataFrame:
    stage, key = result["artifacts"][label].split("/")
    return ArtifactStore(result["root"], options).require(stage, key).read(table)


@pytest.fixture(scope="module")
def local_run(prefect_harness, small_demo, tmp_path_factory):
    config = small_config(small_demo, tmp_path_factory.mktemp("local") / "artifacts")
    return full_pipeline(config)


def _same_as_local(local, other, options=None) -> None:
    for label, table in DETERMINISTIC:
        assert _tables(other, label, table, options).equals(_tables(local, label, table)), (label, table)
    for label, table in (("embed", "text_embeddings"), ("index", "fused_entities")):
        a, b = _tables(local, label, table), _tables(other, label, table, options)
        assert a.drop("vector").equals(b.drop("vector"))
        assert np.allclose(np.stack(a["vector"].to_numpy()), np.stack(b["vector"].to_numpy()), atol=1e-5)
    a, b = _tables(local, "retrieve", "candidates"), _tables(other, "retrieve", "candidates", options)
    assert a.select("mention_id", "rank", "qid").equals(b.select("mention_id", "rank", "qid"))
    assert np.allclose(a["score"].to_numpy(), b["score"].to_numpy(), atol=1e-5)


def test_full_pipeline_on_a_dask_local_cluster_matches_the_local_runner(local_run, small_demo, tmp_path):
    config = small_config(small_demo, tmp_path / "artifacts", runner="dask",
                          dask={"n_workers": 2, "threads_per_worker": 1})
    result = on_runner(full_pipeline, config)(config)
    _same_as_local(local_run, result)
    embed = ArtifactStore(result["root"]).require(*result["artifacts"]["embed"].split("/"))
    retrieve = ArtifactStore(result["root"]).require(*result["artifacts"]["retrieve"].split("/"))
    assert retrieve.manifest["stats"]["search_device"].startswith("dask x4 shards")  # queries went to workers
    assert embed.manifest["stats"]["texts_encoded_now"] > 0


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                                                        "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="kgmel-test")
    yield options
    server.stop()


def test_full_pipeline_on_s3_matches_local_disk_and_survives_a_crash_before_the_manifest(
    local_run, small_demo, s3, monkeypatch
):
    config = small_config(small_demo, "unused", artifacts_options=s3)
    config = config.model_copy(update={"artifacts": "s3://kgmel-test/store"})
    real_write = StoreFS.write_text_atomic

    def crash_before_train_manifest(self, path, text):
        if "/train/" in path and path.endswith("manifest.json"):
            raise ConnectionError("network gone before the manifest")
        return real_write(self, path, text)

    monkeypatch.setattr(StoreFS, "write_text_atomic", crash_before_train_manifest)
    with pytest.raises(Exception, match="network gone"):
        full_pipeline(config)
    store = ArtifactStore("s3://kgmel-test/store", s3)
    [key] = store.keys("train")  # its files were uploaded ...
    assert store.get("train", key) is None  # ... but without a manifest the prefix is never trusted
    monkeypatch.setattr(StoreFS, "write_text_atomic", real_write)
    result = full_pipeline(config)
    assert result["root"] == "s3://kgmel-test/store" and result["artifacts"]["train"] == f"train/{key}"
    _same_as_local(local_run, result, s3)
    assert store.verify() == []
    catalog = Catalog(store)  # DuckDB reads the bucket through the registered fsspec filesystem
    assert catalog.query("select count(*) as n from candidates")["n"][0] == _tables(local_run, "retrieve",
                                                                                     "candidates").height
    assert store.models.require(config.model).served == 1
