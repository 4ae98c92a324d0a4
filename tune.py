"""Optuna searches that prune trials falling behind, recorded in MLflow.

    python tune.py hparams_search=lr_batch                # lr, batch, temperature, frozen layers
    python tune.py hparams_search=budget_pareto           # gain against seconds: the front
    python tune.py hparams_search=lr_batch tune.worker=1  # a second worker on the same study

See docs/hyperparameter_search.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from finetune_budget.app.cli import exit_code, exit_now, guarded_job, tune_job
from finetune_budget.console import quiet_console
from finetune_budget.speed.collector import pause_during_startup


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return guarded_job(tune_job, cfg)  # checks the config before the heavy imports


if __name__ == "__main__":
    quiet_console()  # library chatter to the job's log file, not the console
    pause_during_startup()  # on again, the start-up's objects frozen, once a job has imported
    main()
    exit_now(exit_code())  # without the seconds of module teardown
