"""The running `-m` sweep as the environment names it: its parent MLflow run and the id its
epoch states are kept under.

app.sweep_parent creates the parent and sets FINETUNE_BUDGET_SWEEP_PARENT; the jobs, launchers
and the budget sweeper read it here (no mlflow import: Hydra builds its plugins before a job).
training.sweep_states sets FINETUNE_BUDGET_SWEEP_STATES; training.continuation tags the states.
"""

from __future__ import annotations

import os

PARENT_ENV = "FINETUNE_BUDGET_SWEEP_PARENT"
SWEEP_ENV = "FINETUNE_BUDGET_SWEEP_STATES"  # the running sweep's id for its epoch states


def current_parent() -> str | None:
    """The id of the running sweep's parent run (None outside a sweep)."""
    return os.environ.get(PARENT_ENV) or None
