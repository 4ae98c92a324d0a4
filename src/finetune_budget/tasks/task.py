"""The shared task type: what a task builds (`TaskParts`), the registry of tasks, `build_task`.

Each task is one module of this package (`text_text`, `text_image`, `image_image`, `mlm_price`)
with a `build(cfg) -> TaskParts` function; the registry names them, and a task's module is
imported only when it is built (no import circles, and open_clip loads only for text_image).
A task's LightningModule sets `eval_metrics` ({"val/...": float}) after each validation; its
DataModule (a `data.base.BudgetDataModule`) has `n_train` (the labelled items actually used).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

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


# task.name -> the module of this package that builds it (its `build(cfg)`)
TASKS: dict[str, str] = {
    "text_text": "finetune_budget.tasks.text_text",
    "text_image": "finetune_budget.tasks.text_image",
    "image_image": "finetune_budget.tasks.image_image",
    "mlm_price": "finetune_budget.tasks.mlm_price",
}


def build_task(cfg: DictConfig) -> TaskParts:
    """The DataModule and LightningModule of `cfg.task.name`, from the resolved config."""
    name = cfg.task.name
    if name not in TASKS:
        raise ConfigError(f"task={name} is unknown; use one of {', '.join(sorted(TASKS))}")
    return import_module(TASKS[name]).build(cfg)
