"""The LightningModule: an encoder, a contrastive loss, retrieval evaluation on the held-out split.

After each validation, `eval_metrics` holds {"val/mrr_at_20": ...}; the budget tracker logs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch

from finetune_budget import losses
from finetune_budget.errors import ConfigError
from finetune_budget.matryoshka import matryoshka_loss, truncation_dims
from finetune_budget.metrics import retrieval_metrics
from finetune_budget.models.text import build_sentence_encoder
from finetune_budget.optim import (
    check_finite_embeddings,
    check_finite_loss,
    optimizer_with_schedule,
    weight_decay_groups,
)


class HeldOutRetrievalEval:
    """Lightning hooks shared by the retrieval modules: embed every held-out item once (with the
    module's `eval_embeddings(batch)`; batches carry the items' `index`), rank all of them, and set
    `eval_metrics` ({"val/mrr_at_20": ...}, plus whatever the module's `eval_hooks` add)."""

    eval_hooks: Sequence[Callable[..., dict[str, float]]] = ()  # modules set their own list

    def on_validation_epoch_start(self) -> None:
        self._eval_parts = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_parts.append((batch["index"].cpu(), self.eval_embeddings(batch).float().cpu()))

    def on_validation_epoch_end(self) -> None:
        index = torch.cat([i for i, _ in self._eval_parts])
        emb = torch.cat([e for _, e in self._eval_parts])
        self._eval_parts = []
        check_finite_embeddings(self, emb)
        groups = self.trainer.datamodule.eval_groups[index]
        scores = retrieval_metrics(emb, query_groups=groups, top_k=self.hparams.top_k)
        self.eval_metrics = {f"val/{k}": v for k, v in scores.items()}
        for hook in self.eval_hooks:
            self.eval_metrics.update(hook(self, emb, groups))
        key = f"val/mrr_at_{self.hparams.top_k}"
        self.log(key, self.eval_metrics[key], prog_bar=True, logger=False, rank_zero_only=True)


class EmbeddingFineTuner(HeldOutRetrievalEval, L.LightningModule):
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
        check_finite_loss(self, loss)
        batch_size = next(iter(batch.values()))["input_ids"].shape[0]
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        return loss

    def eval_embeddings(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["input"])

    def configure_optimizers(self):
        return optimizer_with_schedule(
            self, self.hparams.optim, weight_decay_groups(self.named_parameters())
        )
