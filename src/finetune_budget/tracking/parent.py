"""The running `-m` sweep's parent MLflow run, as the environment names it.

app.sweep_parent creates the parent and sets FINETUNE_BUDGET_SWEEP_PARENT; the jobs, launchers
and the budget sweeper read it here (no mlflow import: Hydra builds its plugins before a job).
"""

from __future__ import annotations

import os

PARENT_ENV = "FINETUNE_BUDGET_SWEEP_PARENT"


def current_parent() -> str | None:
    """The id of the running sweep's parent run (None outside a sweep)."""
    return os.environ.get(PARENT_ENV) or None
