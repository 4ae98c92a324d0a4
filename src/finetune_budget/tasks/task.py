"""The shared task type: what a task builds (`TaskParts`) and `build_task`.

Each task is one module of this package (`text_text`, `text_image`, `image_image`, `mlm_price`)
with a `build(cfg, **options) -> TaskParts` function that its `conf/task/*.yaml` names as
`_target_` (the task group's other keys are its options); Hydra imports the module only when the
task is built (no import circles, and open_clip loads only for text_image).
A task's LightningModule sets `eval_metrics` ({"val/...": float}) after each validation; its
DataModule (a `data.base.BudgetDataModule`, built from the `data` group) has `n_train` (the
labelled items actually used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune_budget.errors import ConfigError


@dataclass
class TaskParts:
    datamodule: L.LightningDataModule
    module: L.LightningModule
    n_train: int
    # True when the epoch-0 model has randomly initialised parts (its baseline depends on the seed)
    baseline_depends_on_seed: bool


def plain(node: Any) -> Any:
    """A config node as plain Python values (what modules and DataModules receive)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_task(cfg: DictConfig) -> TaskParts:
    """The DataModule and LightningModule the task group's `_target_` builds from `cfg`."""
    node = cfg.task
    if "_target_" not in node:
        # a config logged before task groups named their builder (evaluate.py run_id=<old run>):
        # every task's builder is `build` in the module of its name
        node = node.copy()
        with open_dict(node):
            node["_target_"] = f"finetune_budget.tasks.{node.name}.build"
    try:
        build = instantiate(node, _partial_=True)
    except InstantiationException as e:
        raise ConfigError(
            f"task={node.name} cannot be built ({node._target_}): {e}; use task=text_text, "
            "text_image, image_image or mlm_price"
        ) from e
    return build(cfg)
