"""Tasks: what a run fine-tunes and on what. Each task builds a DataModule and a LightningModule
from the resolved config; the rest of the study path (tracking, ROI, sweeps) is shared.

A task's module sets `eval_metrics` ({"val/...": float}) after each validation; its DataModule has
`n_train` (the labelled items actually used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_text_text(cfg: DictConfig) -> TaskParts:
    from finetune_budget.data.text import load_text_data
    from finetune_budget.data.text_datamodule import TextRetrievalDataModule
    from finetune_budget.models.text import load_tokenizer
    from finetune_budget.module import EmbeddingFineTuner
    from finetune_budget.probes import attach_eval_hooks

    model_cfg, data_cfg = _plain(cfg.model), _plain(cfg.data)
    data = load_text_data(data_cfg)
    tokenizer = load_tokenizer(model_cfg["tokenizer"])
    dm = TextRetrievalDataModule(
        data,
        tokenizer,
        n=data_cfg["n"],
        subset_seed=data_cfg.get("subset_seed", cfg.seed),
        batch_size=data_cfg["batch_size"],
        samples_per_class=data_cfg.get("samples_per_class", 4),
        eval_batch_size=cfg.eval.batch_size,
        max_length=model_cfg["max_length"],
        num_workers=data_cfg.get("num_workers", 0),
        seed=cfg.seed,
        length_bucket_pool=data_cfg.get("length_bucket_pool", 0),
    )
    module = EmbeddingFineTuner(
        model=model_cfg,
        loss=_plain(cfg.loss),
        optim=_plain(cfg.optim),
        data_kind=data.kind,
        top_k=cfg.eval.top_k,
    )
    attach_eval_hooks(module, cfg, tokenizer)  # eval.truncate_dims, eval.pair_probe (optional)
    random_parts = model_cfg.get("pretrained") is None or bool(model_cfg.get("output_dim"))
    return TaskParts(dm, module, dm.n_train, random_parts)


def build_mlm_price(cfg: DictConfig) -> TaskParts:
    """Masked-LM domain adaptation judged by a price probe (finetune_budget.mlm)."""
    from finetune_budget.mlm import build_mlm_price as build

    return build(cfg)


def build_image_image(cfg: DictConfig) -> TaskParts:
    """Image-to-image search with an ImageNet backbone (finetune_budget.image_module)."""
    from finetune_budget.image_module import build_image_image as build

    return build(cfg)


def build_text_image(cfg: DictConfig) -> TaskParts:
    """Text-to-image search with an open_clip dual encoder (finetune_budget.clip_module)."""
    from finetune_budget.clip_module import build_text_image as build

    return build(cfg)


TASKS: dict[str, Callable[[DictConfig], TaskParts]] = {
    "mlm_price": build_mlm_price,
    "text_text": build_text_text,
    "image_image": build_image_image,
    "text_image": build_text_image,
}


def build_task(cfg: DictConfig) -> TaskParts:
    name = cfg.task.name
    if name not in TASKS:
        raise ConfigError(f"task={name} is unknown; use one of {', '.join(sorted(TASKS))}")
    return TASKS[name](cfg)
