"""What a trial returns: the values of named metrics at the trial's best epoch.

A trial's row is the trained epoch (epoch > 0) with the best value of the first objective; every
objective is read from that row, so `gain/mrr_at_20` and `time/train_s` describe the same moment:
"this budget reached this gain after this many seconds of training".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from finetune_budget.errors import ConfigError

DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class Objective:
    metric: str  # a key of the per-epoch rows: val/mrr_at_20, gain/mrr_at_20, time/train_s, data/n
    direction: str = "maximize"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b


def objectives_from_cfg(cfg: DictConfig) -> list[Objective]:
    """`tune.objectives` (a list of {metric, direction}); without it, maximise budget.metric."""
    tune = cfg.get("tune") or {}
    nodes = tune.get("objectives") or [{"metric": cfg.budget.metric, "direction": "maximize"}]
    out = []
    for node in nodes:
        if not isinstance(node, (dict, DictConfig)) or "metric" not in node:
            raise ConfigError(
                f"tune.objectives has {node!r}; write each objective as "
                "{metric: val/mrr_at_20, direction: maximize}"
            )
        direction = str(node.get("direction", "maximize"))
        if direction not in DIRECTIONS:
            raise ConfigError(
                f"tune.objectives: direction={direction!r} for {node['metric']}; "
                "use maximize or minimize"
            )
        out.append(Objective(str(node["metric"]), direction))
    return out


def best_row(history: Sequence[dict[str, float]], objective: Objective) -> dict[str, float] | None:
    """The trained epoch with the best finite value of `objective` (None: no such epoch)."""
    best = None
    for row in history:
        value = row.get(objective.metric)
        if row["epoch"] <= 0 or value is None or not math.isfinite(value):
            continue
        if best is None or objective.better(value, best[objective.metric]):
            best = row
    return best


def objective_values(
    history: Sequence[dict[str, float]], objectives: Sequence[Objective]
) -> list[float]:
    """One value per objective, read from the best row of the first objective (NaN: none)."""
    row = best_row(history, objectives[0])
    if row is None:
        return [float("nan")] * len(objectives)
    return [float(row.get(o.metric, float("nan"))) for o in objectives]


def sweep_objective(cfg: DictConfig, result: Any) -> float | list[float]:
    """What train.py returns to the Optuna sweeper: a float, or a list (several objectives)."""
    values = objective_values(result.history, objectives_from_cfg(cfg))
    return values[0] if len(values) == 1 else values
