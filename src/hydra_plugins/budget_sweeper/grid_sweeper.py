"""The `-m` grid sweep (Hydra's basic sweeper) with a cheaper up-front check of its jobs.

Hydra's basic sweeper composes every job's config twice: once to check the whole batch before any
job starts, then again when the launcher runs it (0.1-0.2 s each with this project's config
tree; the 30 jobs of `data.n=100,500,1000 trainer.max_epochs=1..10` spent ~4 s on the check).
Which value a dotted key gets (`data.n=500`) cannot make a composition fail where another value
of it does not (a bad value fails the job's own config check, and the sweep's other jobs go on);
which option a config group gets (`model=...`) can. So `GridSweeper` checks the first job and
each job that brings a group option (or top-level key) no checked job had: a missing config still
fails before the first job starts, the user's grid is checked in one composition.

Its launcher then gets the job configs from
`finetune_budget.speed.sweep_configs.DerivedSweepConfigs`:
a job that differs from an earlier one only in plain keys' values (`trainer.max_epochs=3`) gets a
copy of that one's composed config with its values, not a composition from the YAML files.

conf/hydra/sweeper/grid.yaml, the default by conf/hydra/default.yaml. Both are the fast path
`speed.derived_sweep_configs` (speed/switches.py); with it off (or `hydra/sweeper=basic`) Hydra
checks and composes every job itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from finetune_budget.speed.sweep_configs import DerivedSweepConfigs
from finetune_budget.speed.switches import values


def _may_fail_by_value(override: str) -> bool:
    """A config group's option or a top-level key (`model=x`, `hydra/launcher=y`, `seed=1`): not
    a dotted key's value."""
    return "." not in override.split("=", 1)[0].lstrip("+~")


def covering_jobs(batch: Sequence[Sequence[str]]) -> list[Sequence[str]]:
    """The first job of `batch` and, in order, each job bringing an override that may fail by its
    value (`_may_fail_by_value`) no earlier kept job had."""
    seen: set[str] = set()
    kept = []
    for overrides in batch:
        new = {o for o in overrides if _may_fail_by_value(o)} - seen
        if new or not kept:
            kept.append(overrides)
            seen |= new
    return kept


class GridSweeper(BasicSweeper):
    fast = True  # speed.derived_sweep_configs, read from the sweep's config in setup

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.fast = values(config.get("speed"))["derived_sweep_configs"]
        if self.fast:
            hydra_context = HydraContext(
                config_loader=DerivedSweepConfigs(hydra_context.config_loader),
                callbacks=hydra_context.callbacks,
            )
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        super().validate_batch_is_legal(covering_jobs(batch) if self.fast else batch)
