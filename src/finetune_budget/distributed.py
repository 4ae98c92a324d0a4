"""Which process of a multi-process run this is, known before any process group exists.

Lightning's own launcher (`trainer=ddp`: it re-runs the command with LOCAL_RANK=1.. and
NODE_RANK), torchrun (RANK, LOCAL_RANK, GROUP_RANK) and SLURM's srun (SLURM_PROCID) each say so in
the environment. Only global rank 0 creates the MLflow run, records, and prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

# Set (> 0) in every process but global rank 0 by one of the launchers above.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_single_process(trainer: Mapping[str, Any] | None) -> bool:
    """True when the trainer config asks for one process (devices=1 or [i], one node)."""
    if trainer is None:
        return False
    devices = trainer.get("devices", 1)
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        one_device = len(devices) == 1
    else:
        one_device = str(devices) == "1"
    return one_device and int(trainer.get("num_nodes", 1) or 1) == 1


def is_main_process(trainer: Mapping[str, Any] | None = None) -> bool:
    """False in the extra processes (global ranks 1..) of a multi-process run.

    trainer: the run's `trainer` config; a one-process run is always the main process, whatever
    the environment says (e.g. one of several independent `srun` tasks or Optuna workers).
    """
    if is_single_process(trainer):
        return True
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in RANK_VARIABLES)
