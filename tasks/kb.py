"""Stage `kb`: a Wikidata JSON dump -> `entities`, `kb_triples`, `properties` (`kgmel_core.data.kb_build`)."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

from prefect import task

from kgmel_core.config import KBConfig
from kgmel_core.data.kb_build import dump_fingerprint, label_pass, parse_partition, write_kb_tables
from kgmel_core.data.wikidata import KBFilter, ParseStats, partitions
from storage import Artifact
from tasks.common import STAGE_TASK, PipelineContext, logger, run_stage
from tasks.parallel import map_shards


@task(name="kb", **STAGE_TASK)
def kb(ctx: PipelineContext, config: KBConfig) -> Artifact:
    """Pass 1's byte ranges are mapped onto the Dask workers with `runner: dask`."""
    dump = Path(config.dump).resolve()
    if not dump.is_file():
        raise FileNotFoundError(f"kb.dump: Wikidata dump {dump} not found")
    keep = KBFilter.from_file(Path(config.qids_file)) if config.qids_file else KBFilter(None, config.min_sitelinks)
    sources = {"dump": dump_fingerprint(dump)}
    if config.qids_file:
        sources["qids"] = hashlib.sha256(Path(config.qids_file).read_bytes()).hexdigest()

    def build(writer):
        scratch = ctx.store.root / "_scratch" / f"kb-{uuid.uuid4().hex[:8]}"
        try:
            ranges = partitions(dump, config.partitions)
            args = [(dump, start, end, config.language, keep, scratch, i) for i, (start, end) in enumerate(ranges)]
            stats = ParseStats()
            for part_stats in map_shards(ctx.distributed, parse_partition, args):
                stats.merge(part_stats)
            label_stats = label_pass(dump, config.language, scratch)
            unresolved = write_kb_tables(writer.write_table, scratch)
            writer.stats.update(stats.as_dict(), partitions=len(ranges), label_pass_lines=label_stats.lines,
                                language=config.language, tails_without_label=unresolved)
            logger().info("kb: %s", writer.stats)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    stage_config = config.model_dump(exclude={"dump", "qids_file", "partitions"})
    return run_stage(ctx, "kb", stage_config, {}, build, sources=sources)
