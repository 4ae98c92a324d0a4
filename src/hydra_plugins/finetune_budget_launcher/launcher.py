"""The submitit launchers that conf/hydra/launcher/{local,slurm}.yaml name. Hydra instantiates
launchers from the hydra_plugins package only; what they do is in finetune_budget.app.launchers."""

# no `from __future__ import annotations`: Hydra's plugin scan loads this module outside
# sys.modules, where dataclasses cannot resolve string annotations
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf

from finetune_budget.app.launchers import GroupedSubmititLauncher


@dataclass
class FamiliesLocalConf(LocalQueueConf):
    """submitit_local's keys (checked), and how many families run at once (app.launchers)."""

    _target_: str = "hydra_plugins.finetune_budget_launcher.launcher.LocalLauncher"
    parallel: Any = "auto"  # processes at once: an integer, or auto (GPU memory, cores)
    gpu_memory_per_job_gb: float = 8.0  # what auto counts one family to need on a GPU


ConfigStore.instance().store(
    group="hydra/launcher",
    name="finetune_budget_local",
    node=FamiliesLocalConf,
    provider="finetune_budget",
)


class LocalLauncher(GroupedSubmititLauncher):
    """Each group of a sweep's jobs as a local process (submitit's LocalExecutor)."""

    _EXECUTOR = "local"


class SlurmLauncher(GroupedSubmititLauncher):
    """Each group of a sweep's jobs as a task of an sbatch job array (submitit's SlurmExecutor)."""

    _EXECUTOR = "slurm"
