"""Optuna searches over the training config: search spaces from `conf/hparams_search/*.yaml`,
pruning of trials that fall behind, several objectives (gain against budget), MLflow records.

    python train.py -m hparams_search=lr_batch      # Hydra's Optuna sweeper: no pruning
    python tune.py hparams_search=lr_batch          # same space, trials pruned per epoch
"""

from __future__ import annotations

from finetune_budget.app.tuning.objectives import (
    Objective,
    objective_values,
    objectives_from_cfg,
    sweep_objective,
)
from finetune_budget.app.tuning.pareto import cheapest_at_share, pareto_rows
from finetune_budget.app.tuning.pruning import EpochPruning
from finetune_budget.app.tuning.search import SearchResult, run_search
from finetune_budget.app.tuning.space import apply_overrides, parse_search_space, suggest

__all__ = [
    "EpochPruning",
    "Objective",
    "SearchResult",
    "apply_overrides",
    "cheapest_at_share",
    "objective_values",
    "objectives_from_cfg",
    "pareto_rows",
    "parse_search_space",
    "run_search",
    "suggest",
    "sweep_objective",
]
