"""A real local Prefect server + process worker, deployments from prefect.yaml, a run through them, and
`make stop` leaving the user's Prefect profile as it found it (a plain run works afterwards).

The project is copied to a temporary folder first: `scripts/serve.sh` writes the server's URL into the
project's `prefect.toml`, and the test must not touch the checkout it runs from.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SMALL_DEMO

pytestmark = [pytest.mark.slow, pytest.mark.server]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT = ("flows", "tasks", "kgmel_core", "storage", "scripts", "configs", "prefect.yaml", "pyproject.toml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    if shutil.which("curl") is None:
        pytest.skip("curl is needed by scripts/serve.sh")
    copy = tmp_path_factory.mktemp("project")
    for name in PROJECT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy / name)
    from kgmel_core.data.demo_data import generate_demo_dataset

    generate_demo_dataset(copy / "data", SMALL_DEMO)
    small = {
        "dataset": {"path": "data", "name": "small"},
        "artifacts": "artifacts",
        "encoder": {"text_encoder": "minilm", "clip_model": "kgmel-tiny-clip", "clip_pretrained": "train-on-dataset",
                    "bootstrap_epochs": 2},
        "retriever": {"hidden_dim": 32},
        "training": {"epochs": 2, "batch_size": 32},
        "index": {"top_k": 8},
        "generation": {"enabled": False},
        "rerank": {"enabled": False, "candidates": 8},
    }
    (copy / "small.yaml").write_text(yaml.safe_dump(small))
    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.pop("PREFECT_PROFILES_PATH", None)
    env.update(PREFECT_HOME=str(home), KGMEL_PREFECT_PORT=str(_free_port()), KGMEL_BIN=str(BIN))
    return copy, env


@pytest.fixture(scope="module")
def served(project):
    copy, env = project
    start = subprocess.run(
        [str(copy / "scripts" / "serve.sh"), "start"], env=env, capture_output=True, text=True, timeout=400
    )
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        assert f"http://127.0.0.1:{env['KGMEL_PREFECT_PORT']}" in start.stdout
        yield copy, env
    finally:
        subprocess.run([str(copy / "scripts" / "serve.sh"), "stop"], env=env, capture_output=True, timeout=120)


def _run(env, cwd, *args, timeout=120):
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_deployments_are_listed_with_the_nightly_schedule(served):
    copy, env = served
    listed = _run(env, copy, str(BIN / "prefect"), "deployment", "ls")  # the URL comes from ./prefect.toml
    assert listed.returncode == 0, listed.stderr
    for name in ("kgmel/full-pipeline", "kgmel/reindex-kb", "kgmel/link"):
        assert name in listed.stdout
    inspected = _run(env, copy, str(BIN / "prefect"), "deployment", "inspect", "kgmel/reindex-kb")
    assert "0 2 * * *" in inspected.stdout


def test_full_pipeline_deployment_run_completes(served):
    copy, env = served
    run = _run(
        env,
        copy,
        str(BIN / "prefect"),
        "deployment",
        "run",
        "kgmel/full-pipeline",
        "--params",
        json.dumps({"config_path": "small.yaml"}),
        "--watch",
        "--watch-timeout",
        "400",
        timeout=450,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    for stage in ("ingest", "embed", "train", "index", "retrieve", "evaluate"):
        assert any((copy / "artifacts" / stage).glob("*/manifest.json")), stage


def test_stop_leaves_the_profile_as_found_and_a_plain_run_works(served):
    copy, env = served
    stopped = _run(env, copy, str(copy / "scripts" / "serve.sh"), "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not (copy / "prefect.toml").exists()
    profiles = Path(env["PREFECT_HOME"]) / "profiles.toml"
    assert not profiles.exists() or "PREFECT_API_URL" not in profiles.read_text()
    plain = _run(env, copy, str(BIN / "kgmel"), "run", "--config", "small.yaml", timeout=400)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    assert "served: v1" in plain.stdout  # the same model as the deployment run: every stage a cache hit
