"""Optuna searches that prune trials falling behind, recorded in MLflow.

    python tune.py hparams_search=lr_batch                # lr, batch, temperature, frozen layers
    python tune.py hparams_search=budget_pareto           # gain against seconds: the front
    python tune.py hparams_search=lr_batch tune.worker=1  # a second worker on the same study

See docs/hyperparameter_search.md.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from finetune_budget.cli import exit_code, guarded_job
from finetune_budget.tuning import run_search


def run(cfg: DictConfig) -> float:
    result = run_search(cfg)
    study = result.study.study_name
    print(f"\nstudy {study}: {result.counts}; MLflow parent run {result.parent_run_id}")
    print(result.table())
    if result.cheapest is not None:
        share = cfg.tune.target_share
        print(f"cheapest trial reaching {share:.0%} of the best gain: {result.cheapest['trial']}")
    return float(result.rows[0][result.objectives[0].metric]) if result.rows else float("nan")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return guarded_job(run, cfg)


if __name__ == "__main__":
    main()
    sys.exit(exit_code())
