from pathlib import Path

import pytest

# Importing kgmel_core sets the offline environment (kgmel_core/environment.py) before Prefect is imported.
from kgmel_core.data.demo_data import DemoSpec, generate_demo_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMALL_DEMO = DemoSpec(groups=12, distractors=6, seed=3)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, SMALL_DEMO)
    return root


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def small_config(dataset: Path, artifacts: Path, **overrides):
    from kgmel_core.config import deep_merge, load_config

    base = {
        "dataset": {"path": str(dataset), "name": "small-demo"},
        "artifacts": str(artifacts),
        "encoder": {
            "text_encoder": "minilm",
            "image_encoder": "open_clip",
            "clip_model": "kgmel-tiny-clip",
            "clip_pretrained": "train-on-dataset",
            "bootstrap_epochs": 3,
            "batch_size": 64,
        },
        "retriever": {"hidden_dim": 32, "top_p": 3},
        "training": {"epochs": 4, "batch_size": 32, "patience": 2},
        "index": {"top_k": 8},
        "generation": {"enabled": False},
        "rerank": {"enabled": False, "candidates": 8},
    }
    return load_config(None, deep_merge(base, overrides))
