"""Prefect tasks, one per stage: read inputs from the store, call kgmel_core, write the artifact."""

import kgmel_core  # noqa: F401  (sets the offline environment before Prefect is imported)
