"""A real local Prefect server + process worker, deployments from prefect.yaml, a run through them."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_DEMO

pytestmark = [pytest.mark.slow, pytest.mark.server]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if shutil.which("curl") is None:
        pytest.skip("curl is needed by scripts/serve.sh")
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "KGMEL_PREFECT_PORT": str(port),
        "KGMEL_BIN": str(BIN),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    env.pop("PREFECT_PROFILES_PATH", None)
    start = subprocess.run(
        [str(ROOT / "scripts" / "serve.sh"), "start"], env=env, capture_output=True, text=True, timeout=400
    )
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        assert f"http://127.0.0.1:{port}" in start.stdout
        yield env
    finally:
        subprocess.run([str(ROOT / "scripts" / "serve.sh"), "stop"], env=env, capture_output=True, timeout=120)


def _prefect(env, *args, timeout=120):
    return subprocess.run(
        [str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_deployments_are_listed_with_the_nightly_schedule(served):
    listed = _prefect(served, "deployment", "ls")
    assert listed.returncode == 0, listed.stderr
    for name in ("kgmel/full-pipeline", "kgmel/reindex-kb", "kgmel/link"):
        assert name in listed.stdout
    inspected = _prefect(served, "deployment", "inspect", "kgmel/reindex-kb")
    assert "0 2 * * *" in inspected.stdout


def test_full_pipeline_deployment_run_completes(served, tmp_path):
    from kgmel_core.data.demo_data import generate_demo_dataset

    generate_demo_dataset(tmp_path / "data", SMALL_DEMO)
    overrides = {
        "dataset": {"path": str(tmp_path / "data")},
        "artifacts": str(tmp_path / "artifacts"),
        "encoder": {"text_encoder": "minilm", "bootstrap_epochs": 2},
        "retriever": {"hidden_dim": 32},
        "training": {"epochs": 2, "batch_size": 32},
        "index": {"top_k": 8},
        "generation": {"enabled": False},
        "rerank": {"enabled": False, "candidates": 8},
    }
    run = _prefect(
        served,
        "deployment",
        "run",
        "kgmel/full-pipeline",
        "--params",
        json.dumps({"overrides": overrides}),
        "--watch",
        "--watch-timeout",
        "400",
        timeout=450,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    for stage in ("ingest", "embed", "train", "index", "retrieve", "evaluate"):
        assert any((tmp_path / "artifacts" / stage).glob("*/manifest.json")), stage
