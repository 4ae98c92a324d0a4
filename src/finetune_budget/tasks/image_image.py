"""Image-to-image search (task=image_image): a pooled CNN/ViT trunk, an optional projection,
a metric-learning loss over class-aware batches, retrieval evaluation on held-out classes.

    python train.py task=image_image                    MobileNetV2 on CelebA identities

After each validation, `eval_metrics` holds {"val/mrr_at_20": ..., ...}; the budget tracker logs
it. `build(cfg)` makes the task's parts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from finetune_budget.errors import ConfigError
from finetune_budget.models.build import build_model
from finetune_budget.models.vision import backbone_mean_std
from finetune_budget.tasks.module import FineTuner, pick_loss
from finetune_budget.tasks.task import TaskParts

log = logging.getLogger(__name__)


class ImageEmbeddingFineTuner(FineTuner):
    """Fine-tunes an image backbone for search. Receives plain config values, builds its network.

    model: {backbone, pretrained, output_dim, normalize, ...}; loss: {name, temperature, margin};
    optim: {optimizer (partial), schedule, warmup_steps}. Batches: {"images": (B, 3, S, S),
    "labels": (B,), "index"}; held-out {"images", "index"}."""

    def __init__(
        self, model: dict[str, Any], loss: dict[str, Any], optim: dict[str, Any], top_k: int = 20
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.embedder = build_model(model)  # models.vision.ImageEmbedder
        self.loss_name = pick_loss(loss["name"], "labels")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)

    def embed_train(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"embeddings": self(batch["images"]), "labels": batch["labels"]}

    def embed_eval(self, batch: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
        return "items", self(batch["images"])


def build(cfg: DictConfig, **_: Any) -> TaskParts:
    """The image_image task: DataModule and module from the resolved config (tasks.TaskParts;
    the task group's own keys, name and modality, are read where runs are tagged)."""
    from finetune_budget.data.base import build_datamodule
    from finetune_budget.data.image_datamodule import ImageRetrievalDataModule

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if model_cfg["family"] != "image_backbone":
        raise ConfigError(
            f"task=image_image needs an image model, got model={model_cfg['name']}; use "
            "model=mobilenet_v2 (or efficientnet_lite0/1/2, timm_backbone, tiny_cnn)"
        )
    default_mean, default_std = backbone_mean_std(model_cfg["backbone"])
    dm = build_datamodule(
        cfg.data,
        ImageRetrievalDataModule,
        "data=celeba or custom_images",
        image_size=int(model_cfg["image_size"]),
        mean=tuple(model_cfg["mean"] or default_mean),
        std=tuple(model_cfg["std"] or default_std),
        eval_batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
    )
    module = ImageEmbeddingFineTuner(
        model=model_cfg, loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True), top_k=cfg.eval.top_k,
    )  # fmt: skip
    random_parts = model_cfg["pretrained"] is None or bool(model_cfg["output_dim"])
    random_parts = random_parts or model_cfg["backbone"] == "tiny_cnn"
    return TaskParts(dm, module, dm.n_train, random_parts)
