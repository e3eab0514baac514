"""The offline environment comes with the package: a plain `kgmel` (no Makefile, no wrapper) gets it."""

import json
import os
import subprocess
import sys

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
