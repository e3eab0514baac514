"""`kgmel status`: what an artifact store holds, in a few tables an operator reads at a glance."""

from __future__ import annotations

from rich.table import Table

from storage import ArtifactStore, Catalog


def _table(title: str, columns: list[str], rows: list[tuple]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    return table


def store_status(store: ArtifactStore, console) -> None:
    artifacts = list(store.artifacts())
    size = sum(f["bytes"] for a in artifacts for f in a.manifest["content"].values())
    console.print(f"[bold]store[/bold] {store.url}: {len(artifacts)} artifacts, {size / 1e6:.1f} MB")

    datasets = [
        (a.manifest["config"].get("name"), a.key[:12], a.tables.get("mentions"), a.tables.get("entities"),
         a.tables.get("kb_triples"), a.manifest["created_at"][:19])
        for a in artifacts
        if a.stage == "ingest"
    ]
    console.print(_table("datasets (ingest)", ["name", "key", "mentions", "entities", "kb triples", "created"],
                         sorted(datasets, key=lambda r: r[-1])))

    registry = store.models
    models = []
    for name in registry.names():
        state = registry.require(name)
        for v in state.versions:
            index = store.get("index", v.index)
            stats = index.manifest["stats"] if index else {}
            served = "served" if v.number == state.served else ""
            models.append((name, f"v{v.number}", served, v.train[:12], v.index[:12],
                           stats.get("entities", "missing"), stats.get("kind"), v.registered_at[:16]))
    console.print(_table("models", ["name", "version", "", "train", "index", "entities", "kind", "registered"],
                         models))

    catalog = Catalog(store)
    try:
        runs = catalog.query(
            "select left(run_id, 8) as run, any_value(flow) as flow, any_value(model) as model, "
            "strftime(min(finished_at), '%m-%d %H:%M') as started, "
            "count(*) as stages, count(*) filter (cache_hit) as cache_hits, "
            "count(*) filter (status <> 'ok') as failed, round(sum(seconds), 1) as seconds "
            "from runs group by run_id order by min(finished_at) desc limit 8"
        )
        console.print(_table("recent runs", runs.columns, [tuple(r) for r in runs.iter_rows()]))
    except Exception:  # no run yet: nothing to show
        console.print("no runs yet")
    try:
        calls = catalog.query(
            "select stage, model, count(*) as calls, count(*) filter (cached) as cached, "
            "count(*) filter (status <> 'ok') as failed, round(avg(latency_s) filter (not cached), 2) as mean_s "
            "from llm_calls_all group by stage, model order by stage"
        )
        console.print(_table("LLM calls (all runs)", calls.columns, [tuple(r) for r in calls.iter_rows()]))
    except Exception:
        console.print("no LLM calls recorded")
