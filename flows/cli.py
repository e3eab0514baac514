"""`kgmel` command line: run flows locally (no server needed), make demo data, query and verify artifacts,
list and promote the models the store serves."""

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


def _models(args: argparse.Namespace) -> int:
    from storage import ArtifactStore, ModelRegistry

    registry = ModelRegistry(ArtifactStore(args.artifacts).root)
    if args.action == "promote":
        version = registry.promote(args.name, args.version)
        print(f"model {args.name!r}: now serving v{version.number} (train {version.train}, index {version.index})")
        return 0
    for name in [args.name] if args.name else registry.names():
        state = registry.require(name)
        print(f"{name}:")
        for v in state.versions:
            mark = "*" if v.number == state.served else " "
            print(f" {mark} v{v.number}  train {v.train}  index {v.index}  registered {v.registered_at[:19]}  {v.info}")
    return 0


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
            p.add_argument("--model", help="model name reindex-kb / link serve (default: the config's)")
            p.add_argument("--promote", action="store_true", help="serve the model this run trains")
    query = sub.add_parser("query", help="run a read-only SQL query against the artifact catalog")
    query.add_argument("sql")
    query.add_argument("--artifacts", default="artifacts")
    verify = sub.add_parser("verify", help="check every artifact's files against their manifest digests")
    verify.add_argument("--artifacts", default="artifacts")
    verify.add_argument("--quarantine", action="store_true", help="move damaged artifacts aside (rebuilt next run)")
    models = sub.add_parser("models", help="list the named models, or promote a version to be served")
    models.add_argument("action", choices=["list", "promote"])
    models.add_argument("name", nargs="?")
    models.add_argument("version", nargs="?")
    models.add_argument("--artifacts", default="artifacts")
    args = parser.parse_args(argv)

    if args.command == "demo-data":
        from kgmel_core.data.demo_data import DemoSpec, generate_demo_dataset

        print(generate_demo_dataset(args.out, DemoSpec(seed=args.seed)))
        return 0
    if args.command == "query":
        from storage import ArtifactStore, Catalog, QueryRefused

        try:
            print(Catalog(ArtifactStore(args.artifacts)).query(args.sql))
        except QueryRefused as exc:
            print(f"kgmel query: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "verify":
        from storage import ArtifactStore

        store = ArtifactStore(args.artifacts)
        problems = store.verify(full=True)
        for path, problem in problems:
            print(f"DAMAGED {path}: {problem}")
            if args.quarantine:
                stage, key = path.rsplit("/", 2)[-2:]
                store.quarantine(stage, key, problem)
        print(f"{len(problems)} damaged artifact(s) under {store.root}")
        return 1 if problems else 0
    if args.command == "models":
        if args.action == "promote" and not (args.name and args.version):
            parser.error("models promote NAME VERSION")
        return _models(args)
    overrides = _overrides(args.set)
    load_config(args.config, overrides)  # fail fast on a bad config, before Prefect starts
    from flows.pipeline import kgmel

    if args.command == "run":
        result = kgmel(job=args.job, config_path=args.config, overrides=overrides, model=args.model,
                       promote=args.promote)
    else:
        result = kgmel(job="ablations", config_path=args.config, overrides=overrides)
    print(result.get("summary") or result.get("table"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
