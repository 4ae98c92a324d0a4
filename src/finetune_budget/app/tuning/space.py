"""Search spaces: `hydra.sweeper.params` of a `conf/hparams_search/*.yaml`, read with the Hydra
Optuna sweeper's own parser, so `train.py -m` and `tune.py` search the same space.

    optim.optimizer.lr: tag(log, interval(1e-5, 1e-2))   -> FloatDistribution(log=True)
    data.batch_size: choice(16, 32, 64)                  -> CategoricalDistribution
    trainer.max_epochs: range(1, 6)                       -> IntDistribution
    data.n: 500                                           -> fixed value
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from finetune_budget.errors import ConfigError


def parse_search_space(
    params: Mapping[str, Any] | None,
) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
    """hydra.sweeper.params -> (distributions by config key, fixed values by config key)."""
    if not params:
        return {}, {}
    for key in params:
        if str(key).startswith(("+", "~")):
            raise ConfigError(
                f"hydra.sweeper.params: {key!r}; tune.py sets existing keys only, "
                f"drop the {key[0]}"
            )
    try:
        return create_params_from_overrides([f"{k!s}={v}" for k, v in params.items()])
    except Exception as e:  # noqa: BLE001 - the grammar's errors are long; keep the first line
        raise ConfigError(
            f"hydra.sweeper.params does not parse ({str(e).splitlines()[0]}); "
            "see conf/hparams_search/lr_batch.yaml for the syntax"
        ) from None


def suggest(trial: optuna.trial.Trial, space: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """Ask the trial for one value of every distribution."""
    values: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, list(dist.choices))
        elif isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        elif isinstance(dist, FloatDistribution):
            values[name] = trial.suggest_float(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        else:
            raise ConfigError(
                f"hydra.sweeper.params.{name}: {type(dist).__name__} is not supported"
            )
    return values


_ABSENT = object()


def apply_overrides(cfg: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """A copy of `cfg` with config values set (`data.n` -> 500). Config groups (`model`) cannot be
    switched here: they need a new composition, which `train.py -m` does."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in values.items():
            current = OmegaConf.select(out, key, default=_ABSENT, throw_on_missing=False)
            if current is _ABSENT:
                raise ConfigError(
                    f"hydra.sweeper.params.{key}: no such config key; fix the name (e.g. "
                    "optim.optimizer.lr, data.batch_size, model.freeze_layers)"
                )
            if isinstance(current, DictConfig):
                raise ConfigError(
                    f"hydra.sweeper.params.{key} switches a config group; tune.py searches "
                    f"values only: run `python train.py -m hparams_search=...` to search {key}"
                )
            OmegaConf.update(out, key, value, merge=False)
    return out
