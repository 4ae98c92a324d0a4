"""The submitit launchers that conf/hydra/launcher/{local,slurm}.yaml name. Hydra instantiates
launchers from the hydra_plugins package only; what they do is in finetune_budget.app.launchers."""

from __future__ import annotations

from finetune_budget.app.launchers import GroupedSubmititLauncher


class LocalLauncher(GroupedSubmititLauncher):
    """Each group of a sweep's jobs as a local process (submitit's LocalExecutor)."""

    _EXECUTOR = "local"


class SlurmLauncher(GroupedSubmititLauncher):
    """Each group of a sweep's jobs as a task of an sbatch job array (submitit's SlurmExecutor)."""

    _EXECUTOR = "slurm"
