"""The offline environment comes with the package: a plain `kgmel` (no Makefile, no wrapper) gets it; and the
files `make serve` and pip read say what they should."""

import json
import os
import subprocess
import sys
from pathlib import Path

from kgmel_core.environment import OFFLINE_DEFAULTS

PROBE = "import {module}, os, json; print(json.dumps({{k: os.environ.get(k) for k in {names!r}}}))"


def _environment_after_import(module: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in OFFLINE_DEFAULTS} | env
    code = PROBE.format(module=module, names=sorted(OFFLINE_DEFAULTS))
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_importing_the_flows_sets_every_offline_default():
    assert _environment_after_import("flows") == OFFLINE_DEFAULTS


def test_a_variable_the_user_exported_wins():
    seen = _environment_after_import("tasks", DO_NOT_TRACK="0")
    assert seen["DO_NOT_TRACK"] == "0" and seen["HF_HUB_OFFLINE"] == "1"


def test_the_shell_form_exports_the_same_settings():
    clean = {k: v for k, v in os.environ.items() if k not in OFFLINE_DEFAULTS}
    command = "from kgmel_core.environment import shell_exports; print(shell_exports())"
    done = subprocess.run([sys.executable, "-c", command], env=clean, capture_output=True, text=True, check=True)
    assert done.stderr == ""  # no runpy warning in `make serve`'s output
    assert done.stdout.splitlines() == [f"export {k}={v}" for k, v in OFFLINE_DEFAULTS.items()]


ROOT = Path(__file__).resolve().parents[1]


def test_the_serve_banner_reads_the_schedule_as_deployed_from_prefect_yaml(tmp_path):
    """`make serve` once printed "nightly 02:00 UTC" after the cron in prefect.yaml had been changed."""
    line = next(text for text in (ROOT / "scripts" / "serve.sh").read_text().splitlines() if text.startswith("CRON="))
    original = (ROOT / "prefect.yaml").read_text()
    assert '- cron: "0 2 * * *"' in original
    (tmp_path / "prefect.yaml").write_text(original.replace('"0 2 * * *"', '"*/5 * * * *"'))
    done = subprocess.run(["bash", "-c", f'{line}\necho "$CRON"'], cwd=tmp_path, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "*/5 * * * *"


def test_the_license_is_an_spdx_string_so_setuptools_does_not_warn_on_every_install():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str)  # a `{text = ...}` table is what setuptools deprecates
