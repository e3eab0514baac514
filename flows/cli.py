"""`kgmel` command line: run flows locally (no server needed), make demo data, query artifacts."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kgmel_core.config import deep_merge, load_config, parse_override


def _overrides(pairs: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for pair in pairs:
        merged = deep_merge(merged, parse_override(pair))
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kgmel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo-data", help="write the seeded synthetic demo dataset")
    demo.add_argument("--out", default="demo_data")
    demo.add_argument("--seed", type=int, default=0)
    for name, help_text in (
        ("run", "run a flow locally (same flow the deployments run)"),
        ("ablations", "train + evaluate the retriever and its ablations, print a table"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML config file")
        p.add_argument(
            "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value"
        )
        if name == "run":
            p.add_argument("--job", default="full-pipeline")
    query = sub.add_parser("query", help="run SQL against the DuckDB catalog")
    query.add_argument("sql")
    query.add_argument("--artifacts", default="artifacts")
    args = parser.parse_args(argv)

    if args.command == "demo-data":
        from kgmel_core.data.demo_data import DemoSpec, generate_demo_dataset

        print(generate_demo_dataset(args.out, DemoSpec(seed=args.seed)))
        return 0
    if args.command == "query":
        from storage import ArtifactStore, Catalog

        with Catalog(ArtifactStore(args.artifacts)).connect(read_only=True) as con:
            print(con.sql(args.sql))
        return 0
    overrides = _overrides(args.set)
    load_config(args.config, overrides)  # fail fast on a bad config, before Prefect starts
    from flows.pipeline import kgmel

    job = args.job if args.command == "run" else "ablations"
    result = kgmel(job=job, config_path=args.config, overrides=overrides)
    print(result.get("summary") or result.get("table"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
