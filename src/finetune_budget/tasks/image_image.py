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
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from finetune_budget.errors import ConfigError
from finetune_budget.models.vision import backbone_mean_std, build_image_backbone
from finetune_budget.tasks.module import FineTuner, pick_loss
from finetune_budget.tasks.task import TaskParts

log = logging.getLogger(__name__)


class ImageEmbedder(nn.Module):
    """images (B, 3, H, W) -> embeddings (B, D): trunk, optional linear projection, L2 norm."""

    def __init__(
        self,
        backbone: str,
        pretrained: str | None = "auto",
        output_dim: int | None = None,
        normalize: bool = True,
        freeze_norm_stats: bool = False,
    ) -> None:
        super().__init__()
        self.trunk, feature_dim = build_image_backbone(backbone, pretrained)
        self.freeze_norm_stats = freeze_norm_stats
        self.train()  # Lightning keeps each submodule's mode as set here (and restores it)
        self.projection = nn.Linear(feature_dim, output_dim, bias=False) if output_dim else None
        self.normalize = normalize
        self.dim = output_dim or feature_dim

    def train(self, mode: bool = True) -> ImageEmbedder:
        """With freeze_norm_stats, BatchNorm layers keep normalising with their pretrained running
        statistics (eval mode) while the rest trains; their scale and shift still learn."""
        super().train(mode)
        if mode and self.freeze_norm_stats:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.trunk(images)
        if self.projection is not None:
            x = self.projection(x)
        x = x.float()
        return F.normalize(x, dim=-1) if self.normalize else x


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
        self.embedder = ImageEmbedder(
            model["backbone"],
            model.get("pretrained", "auto"),
            model.get("output_dim"),
            model.get("normalize", True),
            model.get("freeze_norm_stats", False),
        )
        self.loss_name = pick_loss(loss.get("name", "auto"), "labels")

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
