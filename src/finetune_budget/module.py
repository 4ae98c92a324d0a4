"""The LightningModule: an encoder, a contrastive loss, retrieval evaluation on the held-out split.

After each validation, `eval_metrics` holds {"val/mrr_at_20": ...}; the budget tracker logs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from finetune_budget import losses
from finetune_budget.errors import ConfigError, DivergedError
from finetune_budget.matryoshka import matryoshka_loss, truncation_dims
from finetune_budget.metrics import retrieval_metrics
from finetune_budget.models.text import build_sentence_encoder


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate at optimiser step s."""
    warmup_steps = max(0, int(warmup_steps))

    def warm(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    if schedule == "warmup_constant":
        return warm
    decay_steps = max(1, total_steps - warmup_steps)

    def decayed(step: int) -> float:
        if step < warmup_steps:
            return warm(step)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ConfigError(
            f"optim.schedule={schedule!r} is unknown; use warmup_constant, linear or cosine"
        )

    return decayed


class EmbeddingFineTuner(L.LightningModule):
    """Fine-tunes a sentence encoder; gets plain config values and builds its network itself."""

    def __init__(
        self,
        model: dict[str, Any],
        loss: dict[str, Any],
        optim: dict[str, Any],
        data_kind: str = "labels",
        top_k: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.encoder = build_sentence_encoder(**model)
        self.encoder.train()  # pretrained weights load in eval mode; fine-tuning uses dropout
        self.loss_name = self._pick_loss(loss.get("name", "auto"), data_kind)
        self.eval_metrics: dict[str, float] = {}
        self.matryoshka_dims = truncation_dims(loss.get("matryoshka_dims"), self.encoder.dim)
        # Optional extra evaluations: hook(module, emb (N, D), groups (N,)) -> {"probe/...": ...}
        self.eval_hooks: list[Callable[..., dict[str, float]]] = []
        self._eval_parts: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def _pick_loss(name: str, data_kind: str) -> str:
        if name == "auto":
            return "infonce" if data_kind == "pairs" else "supcon"
        if name not in ("supcon", "infonce", "triplet"):
            raise ConfigError(
                f"loss.name={name!r} is unknown; use auto, supcon, infonce or triplet"
            )
        if (name == "infonce") != (data_kind == "pairs"):
            raise ConfigError(
                f"loss.name={name} does not fit {data_kind} data; use loss.name=auto"
            )
        return name

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**batch)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        cfg, dims = self.hparams.loss, self.matryoshka_dims  # dims: () = the full embedding only
        if self.loss_name == "infonce":
            return matryoshka_loss(
                lambda q, p: losses.info_nce(q, p, cfg["temperature"]),
                (self(batch["query"]), self(batch["positive"])),
                dims,
            )
        emb = self(batch["input"])
        if self.loss_name == "supcon":
            return matryoshka_loss(
                lambda e: losses.supervised_contrastive(e, batch["labels"], cfg["temperature"]),
                (emb,),
                dims,
            )
        return matryoshka_loss(
            lambda e: losses.batch_hard_triplet(e, batch["labels"], cfg.get("margin", 0.2)),
            (emb,),
            dims,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        if not torch.isfinite(loss):
            lr = self.optimizers().param_groups[0]["lr"]
            raise DivergedError(
                f"training loss became {loss.item()} at epoch {self.current_epoch + 1}, step "
                f"{self.global_step}; lower optim.optimizer.lr (now {lr:.2g}) or use "
                "trainer.precision=32-true"
            )
        batch_size = next(iter(batch.values()))["input_ids"].shape[0]
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        return loss

    # -- evaluation: embed every held-out item once, then rank all of them ---------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_parts = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_parts.append((batch["index"].cpu(), self(batch["input"]).float().cpu()))

    def on_validation_epoch_end(self) -> None:
        index = torch.cat([i for i, _ in self._eval_parts])
        emb = torch.cat([e for _, e in self._eval_parts])
        self._eval_parts = []
        if not torch.isfinite(emb).all():
            raise DivergedError(
                f"the model's embeddings became NaN/inf by epoch {self.current_epoch + 1}; lower "
                f"optim.optimizer.lr (now {self.hparams.optim['optimizer']['lr']:.2g}) or use "
                "trainer.precision=32-true"
            )
        groups = self.trainer.datamodule.eval_groups[index]
        scores = retrieval_metrics(emb, query_groups=groups, top_k=self.hparams.top_k)
        self.eval_metrics = {f"val/{k}": v for k, v in scores.items()}
        for hook in self.eval_hooks:
            self.eval_metrics.update(hook(self, emb, groups))
        key = f"val/mrr_at_{self.hparams.top_k}"
        self.log(key, self.eval_metrics[key], prog_bar=True, logger=False, rank_zero_only=True)

    def configure_optimizers(self):
        cfg = self.hparams.optim
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = instantiate(cfg["optimizer"])(groups)
        total = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1
        schedule = lr_lambda(
            cfg.get("schedule", "warmup_constant"), cfg.get("warmup_steps", 0), total
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
