"""Fine-tune an embedding model on a budget and record what it returns.

python train.py                                               # defaults: MiniLM on CLINC150
python train.py -m data.n=100,500,1000 trainer.max_epochs=1..10   # the budget sweep
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from finetune_budget.cli import (
    exit_code,
    expand_argv,
    format_table,
    guarded_job,
    is_main_process,
)
from finetune_budget.tracking.sweep_parent import current_parent
from finetune_budget.training import train
from finetune_budget.tuning.objectives import sweep_objective


def run(cfg: DictConfig) -> float:
    result = train(cfg, parent_run_id=current_parent())
    if is_main_process(cfg.trainer):  # ranks 1.. of a multi-process run print nothing
        print(f"\nMLflow run {result.run_id} ({cfg.tracking.uri}, {cfg.tracking.experiment})")
        print(format_table(result.history, budget_metric=cfg.budget.metric))
    return sweep_objective(cfg, result)  # tune.objectives of hparams_search, else budget.metric


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return guarded_job(run, cfg)


if __name__ == "__main__":
    sys.argv = expand_argv(sys.argv)
    main()
    sys.exit(exit_code())
