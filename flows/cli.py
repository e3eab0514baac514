"""`kgmel`: run the pipeline's jobs, link new mentions, and inspect, query and verify the artifact store.

Every command validates its arguments and config before Prefect starts (a temporary local server
in the default, server-less mode), so a typo fails in a second, not after the server came up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kgmel_core.config import PipelineConfig, deep_merge, load_config, parse_override

app = typer.Typer(
    name="kgmel",
    help="Run KGMEL's jobs, link new mentions, inspect, query and verify the artifact store. Arguments and config "
    "are checked before Prefect starts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Named models: list versions, promote the one reindex-kb and link serve.")
app.add_typer(models_app, name="models")
# Piped into a log or CI, rich would wrap the tables at 80 columns; a wide fixed width keeps each row on one line.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)


class Job(StrEnum):
    full_pipeline = "full-pipeline"
    reindex_kb = "reindex-kb"
    ablations = "ablations"


class Output(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", exists=True, dir_okay=False, help="YAML config file (configs/*.yaml)."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="SECTION.KEY=VALUE", help="Override a config value (repeatable)."),
]
ArtifactsOption = Annotated[
    str | None,
    typer.Option("--artifacts", "-a", help="Artifact store root (default: the config's, else ./artifacts)."),
]
ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model name to serve (default: the config's model_name, else dataset.name)."),
]


class UserError(Exception):
    """A mistake the user can fix; printed as one line, no traceback."""


def _config(config: Path | None, overrides: list[str] | None) -> tuple[PipelineConfig, dict[str, Any]]:
    merged: dict[str, Any] = {}
    for pair in overrides or []:
        merged = deep_merge(merged, parse_override(pair))
    try:
        return load_config(config, merged), merged
    except ValueError as exc:
        raise UserError(f"invalid config: {exc}") from None


MIN_FREE_BYTES = 256 * 2**20


def _preflight_artifacts(loaded: PipelineConfig) -> None:
    """A local artifacts root must be a folder this user can write (or a path one can be made at):
    otherwise every stage would fail on its first write, after Prefect started. Object-store URLs are
    checked by their first write."""
    if "://" in loaded.artifacts:
        return
    root = Path(loaded.artifacts).resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"artifacts: {root} is a file, not a folder")
    existing = next(p for p in (root, *root.parents) if p.exists())
    where = "" if existing == root else f" (its nearest existing folder {existing})"
    if os.statvfs(existing).f_flag & os.ST_RDONLY or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"artifacts: {root} is not writable{where}")
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"artifacts: only {free / 2**20:.0f} MiB free at {root}{where}; kgmel needs at least "
                        f"{MIN_FREE_BYTES / 2**20:.0f} MiB (the demo writes ~32 MiB, the three benchmarks ~3.2 GiB)")


def _preflight(loaded: PipelineConfig, job: str) -> None:
    """Before Prefect starts: the artifacts root, and the dataset files the job reads (`reindex-kb`: only
    its folder, nothing when the KB comes from a Wikidata dump)."""
    from kgmel_core.data.datasets import DatasetError, DatasetLayout

    _preflight_artifacts(loaded)
    if job == Job.reindex_kb and loaded.kb.dump:
        return
    try:
        DatasetLayout.of(loaded.dataset).preflight(kb_only=job == Job.reindex_kb)
    except DatasetError as exc:
        raise UserError(str(exc)) from None


def _store(artifacts: str | None, config: Path | None):
    """The artifact store named by --artifacts, else by the config, else ./artifacts (a folder or a URL)."""
    from storage import ArtifactStore

    if artifacts is not None:
        return ArtifactStore(artifacts)
    if config is not None:
        loaded = _config(config, None)[0]
        return ArtifactStore(loaded.artifacts, loaded.artifacts_options)
    return ArtifactStore("artifacts")


def _existing_store(artifacts: str | None, config: Path | None):
    if artifacts is None and config is None and not Path("artifacts").is_dir():
        raise UserError("no artifact store at ./artifacts: run a job first, or pass --artifacts")
    return _store(artifacts, config)


def ensure_prefect_api() -> None:
    """When a Prefect API URL is configured (e.g. by `make serve`'s prefect.toml), make sure it answers,
    instead of failing later inside Prefect with a bare connection error."""
    import httpx
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        return
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=3).raise_for_status()
    except httpx.HTTPError as exc:
        where = " (set by ./prefect.toml, written by `make serve`)" if Path("prefect.toml").is_file() else ""
        raise UserError(
            f"the Prefect API at {url}{where} does not answer ({exc}). Start it with `make serve`, or run "
            "`make stop` to run flows without a server."
        ) from None


def start_temporary_server() -> threading.Thread | None:
    """Boot Prefect's temporary API server now, in the background, when no API URL is configured.

    Prefect would start the same server (a child process, `SubprocessASGIServer`) on the flow's first
    API call; started here, its seconds of booting overlap this process importing the pipeline, on
    another core. Join the thread before the flow runs: Prefect marks the server running before it
    answers."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def boot() -> None:
        with contextlib.suppress(Exception):  # Prefect's own first call starts it again and says why it failed
            SubprocessASGIServer().start()

    booting = threading.Thread(target=boot, name="prefect-server-start", daemon=True)
    booting.start()
    return booting


def _run_flow(**params: Any) -> dict:
    ensure_prefect_api()
    booting = start_temporary_server()
    from flows.pipeline import kgmel

    if booting is None:
        result = kgmel(**params)
    else:
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        booting.join()
        # Heartbeats let a server mark a flow whose process died as crashed. A temporary server dies with
        # this process, so nothing reads them, and each flow's exit waits up to a second for their thread.
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            result = kgmel(**params)
    result["report"].render(console)
    return result


@app.command()
def run(
    config: ConfigOption = None,
    set_: SetOption = None,
    job: Annotated[Job, typer.Option("--job", "-j", help="Which job to run.")] = Job.full_pipeline,
    model: ModelOption = None,
    promote: Annotated[bool, typer.Option(help="Serve the model this run trains (full-pipeline).")] = False,
) -> None:
    """Run a job locally: the same flow the deployments run."""
    loaded, overrides = _config(config, set_)
    _preflight(loaded, job.value)
    _run_flow(job=job.value, config_path=str(config) if config else None, overrides=overrides, model=model,
              promote=promote)


@app.command()
def link(
    mentions_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="MIMIC-format JSON list of sentences to link.")
    ],
    image_dir: Annotated[
        Path | None, typer.Option(exists=True, file_okay=False, help="Folder the records' imgPath names live in.")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    model: ModelOption = None,
    config_scope: Annotated[
        bool, typer.Option(help="Apply the config's LLM scope instead of running the LLM on every given mention.")
    ] = False,
) -> None:
    """Link new mentions against the served model's index (no retraining) and print the predictions."""
    loaded, overrides = _config(config, set_)
    _preflight_artifacts(loaded)
    try:
        records = json.loads(mentions_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{mentions_file}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise UserError(f"{mentions_file}: expected a JSON list of sentence records")
    if not records:
        raise UserError(f"{mentions_file}: the list is empty: no sentence records to link")
    result = _run_flow(
        job="link",
        config_path=str(config) if config else None,
        overrides=overrides,
        mentions_file=str(mentions_file.resolve()),
        image_dir=str(image_dir.resolve()) if image_dir else None,
        model=model,
        llm_scope="config" if config_scope else "given",
    )
    from storage import ArtifactStore, Catalog

    catalog = Catalog(ArtifactStore(result["root"], loaded.artifacts_options))
    # A mention the served NIL model (nil.enabled) finds absent from the KB is answered NIL, not with its top-1.
    console.print(catalog.query(
        "select mention_id, mention, if(nil, 'NIL', predicted_qid) as predicted_qid, "
        "if(nil, 'NIL', predicted_label) as predicted_label, source, score, nil_score "
        "from predictions_labeled order by mention_id"))


@app.command()
def reindex(config: ConfigOption = None, set_: SetOption = None, model: ModelOption = None) -> None:
    """Re-read the KB and rebuild the served model's index (what the nightly deployment runs)."""
    loaded, overrides = _config(config, set_)
    _preflight(loaded, Job.reindex_kb)
    _run_flow(job="reindex-kb", config_path=str(config) if config else None, overrides=overrides, model=model)


@app.command()
def ablations(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Train and evaluate the retriever and its ablations (no triples / image / gate); nothing is served."""
    loaded, overrides = _config(config, set_)
    _preflight(loaded, Job.ablations)
    _run_flow(job="ablations", config_path=str(config) if config else None, overrides=overrides)


@app.command()
def generate(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Stage 1 alone: triples about the mentions in `generation.scope` (resumes where a stopped run ended)."""
    loaded, overrides = _config(config, [*(set_ or []), "generation.enabled=true"])
    _preflight(loaded, "generate")
    _run_flow(job="generate", config_path=str(config) if config else None, overrides=overrides)


kb_app = typer.Typer(help="The KB from a Wikidata JSON dump.")
app.add_typer(kb_app, name="kb")


@kb_app.command("build")
def kb_build_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    dump: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="latest-all.json[.gz|.bz2]")] = None,
    language: Annotated[str | None, typer.Option(help="Label language (default en).")] = None,
    qids: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Keep exactly these QIDs.")] = None,
    min_sitelinks: Annotated[int | None, typer.Option(help="Keep items with at least this many sitelinks.")] = None,
) -> None:
    """Stream a Wikidata dump into `entities` / `kb_triples` Parquet artifacts (the `kb` stage)."""
    given = {"dump": str(dump.resolve()) if dump else None, "language": language,
             "qids_file": str(qids.resolve()) if qids else None, "min_sitelinks": min_sitelinks}
    _, overrides = _config(config, [*(set_ or []), *[f"kb.{k}={v}" for k, v in given.items() if v is not None]])
    _run_flow(job="kb", config_path=str(config) if config else None, overrides=overrides)


@app.command("benchmark")
def benchmark_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Run only this variant (repeatable). Default: the baselines, the retriever, w/o triples, "
                          "+ reranker and w/o fusion; the retriever design study and the reranker's fact variants "
                          "only when named."),
    ] = None,
) -> None:
    """Zero-shot baselines, the KGMEL retriever, an ablation and the reranker on one dataset: val table, plots."""
    from kgmel_core.variants import variants_for

    offered = {**variants_for("benchmark"), **variants_for("retriever-study"), **variants_for("reranker-facts")}
    if unknown := [v for v in variant or [] if v not in offered]:
        raise UserError(f"unknown benchmark variant {unknown[0]!r}; choose from: " + ", ".join(map(repr, offered)))
    loaded, overrides = _config(config, set_)
    _preflight(loaded, "benchmark")
    _run_flow(job="benchmark", config_path=str(config) if config else None, overrides=overrides,
              variants=variant or None)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SELECT or EXPLAIN; views as in the README.")],
    artifacts: ArtifactsOption = None,
    config: ConfigOption = None,
    output: Annotated[Output, typer.Option(help="How to print the rows.")] = Output.table,
) -> None:
    """Run a read-only SQL query over the artifact catalog (DuckDB)."""
    from storage import Catalog, QueryRefused

    store = _existing_store(artifacts, config)
    try:
        frame = Catalog(store).query(sql)
    except QueryRefused as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # DuckDB's own message (unknown view or column) is what the user needs
        raise UserError(f"query failed: {exc}") from None
    if output == Output.csv:
        nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
        if nested:  # CSV has no lists: say which columns, instead of polars' traceback
            raise UserError(f"--output csv cannot hold the nested columns {nested}: leave them out, turn them "
                            "into text in the SQL (e.g. to_json(vector)), or use --output json")
        sys.stdout.write(frame.write_csv())
    elif output == Output.json:
        sys.stdout.write(frame.write_json())
    else:
        import polars as pl

        with pl.Config(tbl_rows=100, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            print(frame)


@app.command()
def status(artifacts: ArtifactsOption = None, config: ConfigOption = None) -> None:
    """What the store holds: datasets, models and what they serve, recent runs, LLM calls."""
    from flows.status import store_status

    store_status(_existing_store(artifacts, config), console)


@app.command()
def verify(
    artifacts: ArtifactsOption = None,
    config: ConfigOption = None,
    quarantine: Annotated[bool, typer.Option(help="Move damaged artifacts aside; the next run rebuilds them.")] = False,
) -> None:
    """Check every artifact's files against the sha256 digests in its manifest."""
    store = _existing_store(artifacts, config)
    problems = store.verify(full=True)
    for path, problem in problems:
        console.print(f"[red]DAMAGED[/red] {path}: {problem}", highlight=False)
        if quarantine:
            stage, key = path.rstrip("/").split("/")[-2:]
            store.quarantine(stage, key, problem)
    console.print(f"{len(problems)} damaged artifact(s) under {store.url}")
    if problems:
        raise typer.Exit(1)


@models_app.command("list")
def models_list(name: Annotated[str | None, typer.Argument()] = None, artifacts: ArtifactsOption = None) -> None:
    """Versions of each model name; * marks the served one."""

    registry = _existing_store(artifacts, None).models
    names = [name] if name else registry.names()
    if not names:
        console.print("no models registered yet: run `kgmel run` (full-pipeline) first")
    for each in names:
        state = registry.require(each)
        console.print(f"[bold]{each}[/bold]")
        for v in state.versions:
            mark = "*" if v.number == state.served else " "
            served_with = "".join(f"  {part} {key}" for part, key in (("reranker", v.reranker), ("nil", v.nil)) if key)
            console.print(f" {mark} v{v.number}  train {v.train}  index {v.index}{served_with}  "
                          f"{v.registered_at[:19]}  {v.info}", highlight=False)


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version number (2, v2) or a prefix of its train key.")],
    artifacts: ArtifactsOption = None,
) -> None:
    """Serve a version: reindex-kb and link use it from now on."""

    chosen = _existing_store(artifacts, None).models.promote(name, version)
    console.print(f"model {name!r}: now serving v{chosen.number} (train {chosen.train}, index {chosen.index})")


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Folder to write.")] = Path("demo_data"),
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write the seeded synthetic demo dataset (MIMIC layout)."""
    from kgmel_core.data.demo_data import DemoSpec, generate_demo_dataset

    console.print(generate_demo_dataset(out, DemoSpec(seed=seed)))


def _print_error(exc: BaseException) -> None:
    """One line, never wrapped at the terminal's width (it is read, grepped and tested whole), and its
    text printed as is: a message quoting `[brackets]` is not rich markup."""
    from rich.markup import escape

    console.print(f"[red]kgmel: error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Usage errors (unknown option or choice, missing file) are typer's: exit 2 with its
    message. Known user errors print one line: exit 2 for arguments, 1 for what a run found.

    SIGTERM ends the process as an exception, not by the signal's default action: only a normal exit
    runs the `atexit` hooks that stop the temporary Prefect server (a uvicorn process that would
    otherwise outlive the run) and Dask's local cluster. Prefect's flow engine re-sends the signal to
    the handler it found, which is this one."""
    from kgmel_core.data.datasets import DatasetError
    from storage import ArtifactError, RegistryError

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app(args=argv)
    except SystemExit as exc:  # typer's standalone mode: --help, usage errors, typer.Exit
        return exc.code if isinstance(exc.code, int) else 0
    except UserError as exc:
        _print_error(exc)
        return 2
    except (RegistryError, ArtifactError, DatasetError, ValueError) as exc:
        # ValueError covers a config the served model contradicts (ServedModelMismatch)
        _print_error(exc)
        return 1
    except Exception as exc:
        from tasks.common import StageFailed

        if isinstance(exc, StageFailed):  # the flow logged the traceback; one line here
            _print_error(exc)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
