"""Evaluate a model on a held-out split and log it to MLflow (other modes: see conf/evaluate.yaml).

python evaluate.py                          # the pretrained default model
python evaluate.py run_id=<mlflow run id>   # the checkpoint a training run saved
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from finetune_budget.app.cli import evaluate_job, exit_code, exit_now, expand_argv, guarded_job
from finetune_budget.console import quiet_console
from finetune_budget.speed.collector import pause_during_startup


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    guarded_job(evaluate_job, cfg)  # checks the config before the heavy imports


if __name__ == "__main__":
    quiet_console()  # library chatter to the job's log file, not the console
    pause_during_startup()  # on again, the start-up's objects frozen, once a job has imported
    sys.argv = expand_argv(sys.argv)
    main()
    exit_now(exit_code())  # without the seconds of module teardown
