"""The adaptive budget search as a Hydra sweeper (config: conf/hydra/sweeper/budget.yaml).

    python train.py -m hydra/sweeper=budget data=stsb hydra.sweeper.seeds=[0,1,2]

Hydra finds it in the `hydra_plugins` namespace package. The sweeper launches each step's jobs
(`data.n`, `seed`, `trainer.max_epochs` plus the command line's overrides) through the configured
launcher, reads their runs from MLflow (children of the sweep's parent run, which
`app.sweep_parent` creates), and leaves every decision to `finetune_budget.study.search`
(`finetune_budget.app.budget_search` reads the runs and records the decisions).
Before the pilot it counts the data group's training items (`training_items`): no job asks
for more than the data holds (`n_max`). The advice engine's settings and the prices come from
conf/advise/default.yaml, composed as `hydra.sweeper.advise`. The parent gets the decisions
table, the advice and the cost as artifacts and tags; the log ends with the `mode=advise`
command that gives the same advice from the store.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from finetune_budget.errors import ConfigError
from finetune_budget.tracking.parent import current_parent

if TYPE_CHECKING:
    from finetune_budget.study import search as budget_search

# Hydra imports every plugin module at the start of every run (plugin discovery), so mlflow and
# the study's modules are imported where the budget sweeper uses them: a plain `python train.py`
# and its config check do not wait for them.

log = logging.getLogger(__name__)

CHOSEN = ("data.n", "seed", "trainer.max_epochs")


class BudgetSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from finetune_budget.study import search as budget_search

        self.settings = budget_search.SearchSettings.from_config(settings)
        self.config: DictConfig | None = None
        self.launcher = None
        self.job_idx = 0

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> budget_search.SearchResult:
        from mlflow.tracking import MlflowClient

        from finetune_budget.app import budget_search as search_runs
        from finetune_budget.study import search as budget_search

        assert self.config is not None and self.launcher is not None
        fixed = fixed_overrides(arguments)
        parent = current_parent()
        if parent is None:
            raise ConfigError(
                "hydra/sweeper=budget records its decisions on the sweep's parent run; "
                "keep hydra.callbacks.sweep_parent on"
            )
        uri, experiment = self.config.tracking.uri, self.config.tracking.experiment
        metric = str(self.config.budget.metric)

        def measure(jobs: list[budget_search.Job]) -> budget_search.Batch:
            start = time.perf_counter()
            returns = self.launcher.launch(
                [[*fixed, *job.overrides()] for job in jobs], initial_job_idx=self.job_idx
            )
            cost = time.perf_counter() - start
            self.job_idx += len(returns)
            failures = [
                f"{' '.join(job.overrides())}: {ret._return_value!r}"
                for job, ret in zip(jobs, returns, strict=True)
                if ret.status != JobStatus.COMPLETED
            ]
            found = search_runs.from_mlflow(uri, experiment, metric, parent)
            keys = [(j.n, j.seed, j.epochs) for j in jobs]
            obs = [found[k] for k in keys if k in found]
            failures += [
                f"{' '.join(j.overrides())}: no finished MLflow run (see its log)"
                for j in jobs
                if (j.n, j.seed, j.epochs) not in found
            ]
            return budget_search.Batch(obs, cost, failures)

        settings = self.settings
        if settings.metric is None:  # the fitted gain is bounded by budget.metric's ceiling
            settings = dataclasses.replace(settings, metric=metric)
        settings = dataclasses.replace(settings, n_max=self.n_max(settings))
        result = budget_search.run_search(measure, settings)
        search_runs.record(MlflowClient(uri), parent, result)
        log.info("%s", result.summary())
        log.info(
            "the same advice from the runs: python evaluate.py mode=advise %s",
            " ".join(advise_overrides(settings, uri, experiment, parent)),
        )
        return result

    def n_max(self, settings: budget_search.SearchSettings) -> int | None:
        """hydra.sweeper.n_max, at most the training set's size (never a job asking for more
        items than the data holds); a pilot larger than the data is refused."""
        from finetune_budget.app import budget_search as search_runs

        assert self.config is not None
        data = OmegaConf.to_container(self.config.data, resolve=True)
        size = search_runs.training_items(data)
        if size is None:
            return settings.n_max
        if max(settings.pilot_n) > size:
            raise ConfigError(
                f"hydra.sweeper.pilot_n={list(settings.pilot_n)} asks for more than the {size} "
                f"training items of data={data.get('name')}; give pilot sizes <= {size}"
            )
        return size if settings.n_max is None else min(settings.n_max, size)


def advise_overrides(
    settings: budget_search.SearchSettings, uri: str, experiment: str, parent: str
) -> list[str]:
    """evaluate.py's overrides that ask mode=advise the search's question on the search's runs."""
    out = [f"tracking.uri={uri}", f"tracking.experiment={experiment}", f"report.sweep={parent}"]
    engine = settings.engine()
    out.append(f"advise.metric={engine.metric}")
    defaults = type(engine)()
    for key in (
        "target_gain",
        "target_value",
        "level",
        "label_cost",
        "compute_cost_per_hour",
        "miss_penalty",
        "value_per_gain",
        "drop_fraction",
        "share",
        "calibration",
    ):
        if getattr(engine, key) != getattr(defaults, key):
            out.append(f"advise.{key}={getattr(engine, key)}")
    return out


def fixed_overrides(arguments: Sequence[str]) -> list[str]:
    """The command line's overrides, each a single value; the sweeper chooses CHOSEN itself."""
    out = []
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element()
        if override.is_sweep_override():
            raise ConfigError(
                f"hydra/sweeper=budget chooses the budgets itself; {key} is a sweep here: give "
                "one value (several models or data sets: run one budget search each)"
            )
        if key.lstrip("+~") in CHOSEN:
            raise ConfigError(
                f"hydra/sweeper=budget sets {key} itself; drop it and set "
                "hydra.sweeper.pilot_n, hydra.sweeper.seeds or hydra.sweeper.epochs instead"
            )
        out.append(f"{key}={override.get_value_element_as_str()}")
    return out
