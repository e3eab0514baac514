"""Prefect tasks, one per stage: read inputs from the store, call kgmel_core, write the artifact."""
