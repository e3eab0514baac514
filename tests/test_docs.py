"""The docs cannot drift from the code: the table reference is generated from the schemas, the README
stays a front door, and the stages' artifacts hold the tables the reference lists."""

import importlib.util
import re
from pathlib import Path

from kgmel_core.schemas import STAGE_TABLES

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("artifact_docs", ROOT / "scripts" / "artifact_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_artifact_reference_is_generated_from_the_schemas():
    docs = _generator()
    page = docs.PAGE.read_text()
    assert docs.rendered(page) == page, "docs/artifacts.md is stale: run python scripts/artifact_docs.py"


def test_every_table_a_task_writes_is_in_the_reference():
    written = set()
    for path in (ROOT / "tasks").glob("*.py"):
        written |= set(re.findall(r'write_table\(\s*"(\w+)"', path.read_text()))
    listed = {table for tables in STAGE_TABLES.values() for table in tables}
    assert written <= listed, written - listed


def test_the_readme_is_a_front_door_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[\w./-]+)\)", readme):
        assert (ROOT / target).is_file(), target
