"""The end-of-run summary: per-stage outcome, loud warnings, metrics. One object, two renderings:
markdown for the run's Prefect artifact (what `--watch` and UI users read), a rich table for the terminal."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import polars as pl
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError

from kgmel_core.metrics import METRICS_SHOWN, metric_tables, metrics_markdown
from storage import ArtifactStore
from storage.runs import StageRecord

SUMMARY_ARTIFACT_KEY = "kgmel-run-summary"


def skip_warnings(store: ArtifactStore, records: list[StageRecord]) -> list[str]:
    """Loud notes: skipped records, mentions read lossily (not in their sentence, no image), LLM stages that
    asked nothing or whose calls failed."""
    warnings = []
    for record in records:
        if record.status != "ok" or record.stage not in ("ingest", "ingest_link", "generate", "rerank", "evaluate",
                                                            "fit_nil", "decide_nil"):
            continue
        stats = store.require(record.stage, record.key).manifest["stats"]
        if stats.get("out_of_kb_skipped"):
            warnings.append(f"NOTE evaluate: no out-of-KB evaluation: {stats['out_of_kb_skipped']}")
        if record.stage == "fit_nil" and stats.get("skipped"):
            warnings.append(f"NOTE fit_nil: no NIL model for this version (link cannot say NIL): {stats['skipped']}")
        if stats.get("undecided"):
            warnings.append(f"NOTE decide_nil: {stats['undecided']} mentions undecided (nil_score null): their "
                            "lists lack a score the NIL model reads (the reranker's gate skipped them)")
        if stats.get("rejected_records"):
            warnings.append(
                f"WARNING {record.stage}: {stats['rejected_records']} bad records skipped "
                "(dataset.bad_records=skip); each is in the `rejected` table with file, record, field and reason"
            )
        if stats.get("mentions_not_in_sentence"):
            warnings.append(
                f"NOTE {record.stage}: {stats['mentions_not_in_sentence']} mentions do not occur in their sentence "
                f"(kept, e.g. {stats['mentions_not_in_sentence_examples'][0]})"
            )
        if stats.get("sentences_cut"):
            warnings.append(
                f"NOTE {record.stage}: {stats['sentences_cut']} sentences longer than dataset.max_sentence_chars="
                f"{stats.get('max_sentence_chars')} were cut to a window around their first mention"
            )
        for side in ("mention", "entity"):
            if stats.get(f"{side}_images_over_max_pixels"):
                warnings.append(
                    f"NOTE {record.stage}: {stats[f'{side}_images_over_max_pixels']} {side} images larger than "
                    "dataset.max_image_pixels count as no image (named in the stage's stats)"
                )
        if record.stage == "ingest_link" and stats.get("mentions_without_image"):
            why = "no image folder was given (kgmel link --image-dir, or the link deployment's image_dir)" if not \
                stats.get("image_dir") else f"their image is not in {stats['image_dir']}"
            warnings.append(
                f"WARNING ingest_link: {stats['mentions_without_image']} of {stats.get('mentions')} mentions are "
                f"linked from text alone: {why}"
            )
        asked, total = stats.get("in_scope"), stats.get("mentions")
        if asked == 0 and total:
            warnings.append(
                f"WARNING {record.stage}: none of the {total} mentions is in the configured LLM scope "
                f"({record.stage} scope); no LLM call was made"
            )
        if record.stage == "rerank" and asked and stats.get("sent_to_llm") == 0:
            warnings.append(
                f"NOTE rerank: retrieval's top-1 kept for all {asked} in-scope mentions (no margin below "
                f"rerank.margin_threshold={stats.get('margin_threshold')}); null asks the LLM about every one"
            )
        if stats.get("calls_failed"):
            warnings.append(
                f"WARNING {record.stage}: {stats['calls_failed']} of {stats.get('calls', '?')} LLM calls failed "
                f"(attempt {stats.get('attempt', 1)}); a re-run calls only those again"
            )
    return warnings


@dataclass
class RunSummary:
    title: str
    catalog: str
    records: list[StageRecord]
    notes: list[str] = field(default_factory=list)
    metrics: pl.DataFrame | None = None
    shown: tuple[str, ...] = METRICS_SHOWN

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", *[f"- {note}" for note in self.notes], ""]
        lines += [f"Query the artifacts: `kgmel query \"...\"` (catalog `{self.catalog}`)", ""]
        lines += ["| stage | key | cache hit | rows | seconds | note |", "|---|---|---|---|---|---|"]
        for r in self.records:
            hit = "yes" if r.cache_hit else "no"
            lines.append(f"| {r.stage} | `{r.key}` | {hit} | {r.rows} | {r.seconds:.1f} | {r.note or ''} |")
        if self.metrics is not None:
            lines += ["", "## Metrics", "", metrics_markdown(self.metrics, self.shown)]
        return "\n".join(lines)

    def publish(self) -> None:
        """Attach the summary to the current Prefect flow run (no-op outside one)."""
        with contextlib.suppress(MissingContextError):
            create_markdown_artifact(self.markdown(), key=SUMMARY_ARTIFACT_KEY, description=self.title)

    def render(self, console) -> None:
        """Print to a rich console: notes, a stage table, the metrics table."""
        from rich.table import Table

        console.rule(self.title)
        for note in self.notes:
            console.print(note, style="bold red" if note.startswith("WARNING") else None, highlight=False)
        stages = Table(title="stages", title_justify="left")
        for column in ("stage", "key", "cache hit", "rows", "seconds", "note"):
            stages.add_column(column, justify="right" if column in ("rows", "seconds") else "left")
        for r in self.records:
            hit = "yes" if r.cache_hit else "no"
            stages.add_row(r.stage, r.key, hit, str(r.rows), f"{r.seconds:.1f}", r.note or "")
        console.print(stages)
        if self.metrics is not None and self.metrics.height:
            for title, wide in metric_tables(self.metrics, self.shown):
                table = Table(title=f"metrics: {title}", title_justify="left")
                for column in wide.columns:
                    table.add_column(column, justify="left" if column in ("method", "split") else "right")
                for row in wide.iter_rows():
                    table.add_row(*["" if v is None else str(v) for v in row])
                console.print(table)
        console.print(f"catalog: {self.catalog}   (kgmel query \"from predictions_labeled limit 5\")", highlight=False)
