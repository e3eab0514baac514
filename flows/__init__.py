"""Prefect flows: `kgmel` (the deployable entry) dispatching to full-pipeline, reindex-kb, link, evaluate."""

import kgmel_core  # noqa: F401  (sets the offline environment before Prefect is imported)
