"""Fine-tune an embedding model on a budget and record what it returns.

python train.py                                               # defaults: MiniLM on CLINC150
python train.py -m data.n=100,500,1000 trainer.max_epochs=1..10   # the budget sweep
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from finetune_budget.app.cli import exit_code, exit_now, expand_argv, guarded_job, train_job
from finetune_budget.console import quiet_console
from finetune_budget.speed.collector import pause_during_startup


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return guarded_job(train_job, cfg)  # checks the config before the heavy imports


if __name__ == "__main__":
    quiet_console()  # library chatter to the job's log file, not the console
    pause_during_startup()  # on again, the start-up's objects frozen, once a job has imported
    sys.argv = expand_argv(sys.argv)
    main()
    exit_now(exit_code())  # without the seconds of module teardown
