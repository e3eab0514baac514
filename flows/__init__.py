"""Prefect flows: `kgmel` (the deployable entry) dispatching to full-pipeline, reindex-kb, link, evaluate."""
