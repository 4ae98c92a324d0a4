"""What every task's LightningModule shares: the loss choice, the training step with its
finite-loss check, the optimiser and schedule, and the held-out evaluation. A task's module adds
only its encoder and its batch format:

    embed_train(batch) -> {"embeddings": (B, D), "labels": (B,)}        labelled items
                        | {"queries": (B, D), "positives": (B, D)}      pairs
                        | {"images": (B, D), "texts": (B, D)}           image-caption pairs
    embed_eval(batch) -> (kind, (B, D))    one held-out batch (every batch carries `index`)
    score(parts) -> {"val/...": float}      parts: {kind: (index (N,), embeddings (N, D))}

After each validation `eval_metrics` holds the scores; the budget tracker logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch

from finetune_budget.errors import ConfigError
from finetune_budget.retrieval import losses
from finetune_budget.retrieval.matryoshka import matryoshka_loss
from finetune_budget.retrieval.metrics import retrieval_metrics
from finetune_budget.retrieval.optim import (
    check_finite_embeddings,
    check_finite_loss,
    clip_for_fused,
    optimizer_with_schedule,
    weight_decay_groups,
)

# kind of training data -> (the loss `loss.name=auto` picks, the losses that fit it)
LOSSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "labels": ("supcon", ("supcon", "triplet")),
    "pairs": ("infonce", ("infonce",)),
    "image_text": ("clip", ("clip",)),
}


def pick_loss(name: str, data_kind: str) -> str:
    """The loss `loss.name` means for `data_kind` data; a clear error when it does not fit."""
    default, fitting = LOSSES[data_kind]
    if name == "auto":
        return default
    known = sorted({n for _, names in LOSSES.values() for n in names})
    if name not in known:
        raise ConfigError(f"loss.name={name!r} is unknown; use auto or one of {', '.join(known)}")
    if name not in fitting:
        raise ConfigError(
            f"loss.name={name} does not fit {data_kind} data; use loss.name=auto "
            f"(or {', '.join(fitting)})"
        )
    return name


class FineTuner(L.LightningModule):
    """The shape of every task's module. Subclasses receive plain config values, call
    `save_hyperparameters` with at least `optim` (and `loss`, `top_k` where they use them),
    build their network, and set `loss_name` (see `pick_loss`)."""

    loss_name: str = "supcon"
    matryoshka_dims: tuple[int, ...] = ()  # () = the full embedding only

    def __init__(self) -> None:
        super().__init__()
        self.eval_metrics: dict[str, float] = {}
        self.loss_fn: torch.nn.Module | None = None  # loss_name=clip: open_clip's ClipLoss
        # Optional extra evaluations: hook(module, emb (N, D), groups (N,)) -> {"probe/...": ...}
        self.eval_hooks: list[Callable[..., dict[str, float]]] = []
        self._eval_parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # -- what a task defines ---------------------------------------------------------------------
    def embed_train(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def embed_eval(self, batch: dict[str, Any]) -> tuple[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def primary_metric(self) -> str:
        """The metric shown in the progress bar."""
        return f"val/mrr_at_{self.hparams.top_k}"

    def score(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Retrieval among the held-out items: each queries all others, same group = relevant
        (the DataModule's `eval_groups`), then the module's `eval_hooks`."""
        index, emb = parts["items"]
        groups = self.trainer.datamodule.eval_groups[index]
        emb = emb.to(self.device)  # gathered on the CPU (validation_step); scored on the device
        scores = retrieval_metrics(emb, query_groups=groups, top_k=self.hparams.top_k)
        out = {f"val/{k}": v for k, v in scores.items()}
        for hook in self.eval_hooks:
            out.update(hook(self, emb, groups))
        return out

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups (decayed weights; biases and norms without decay)."""
        return weight_decay_groups(self.named_parameters())

    # -- training --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.loss_name == "clip":
            from open_clip.loss import ClipLoss

            world = self.trainer.world_size if self._trainer is not None else 1
            rank = self.trainer.global_rank if self._trainer is not None else 0
            # Under DDP every rank scores its queries against all ranks' features, gathered with
            # their gradients: 2 devices x batch B trains like 1 device x batch 2B.
            self.loss_fn = ClipLoss(
                local_loss=world > 1, gather_with_grad=world > 1, rank=rank, world_size=world
            )

    def contrastive_loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """`loss_name` on `embed_train`'s output (over every rank's batch under DDP)."""
        if self.loss_name == "clip":  # symmetric InfoNCE over image-caption pairs
            if self.loss_fn is None:
                self.setup("fit")
            return self.loss_fn(out["images"], out["texts"], out["logit_scale"])
        cfg = self.hparams.loss
        if self.loss_name == "infonce":
            fn = partial(losses.info_nce, temperature=cfg["temperature"])
            return matryoshka_loss(fn, (out["queries"], out["positives"]), self.matryoshka_dims)
        if self.loss_name == "supcon":
            fn = partial(
                losses.supervised_contrastive, labels=out["labels"], temperature=cfg["temperature"]
            )
        else:
            margin = cfg["margin"]
            fn = partial(losses.batch_hard_triplet, labels=out["labels"], margin=margin)
        return matryoshka_loss(fn, (out["embeddings"],), self.matryoshka_dims)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.contrastive_loss(self.embed_train(batch))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        check_finite_loss(self, loss)
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
            batch_size=len(batch["index"]),
        )  # fmt: skip
        return loss

    def configure_optimizers(self):
        return optimizer_with_schedule(self, self.hparams.optim, self.param_groups())

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        if not clip_for_fused(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )

    # -- held-out evaluation: every held-out item embedded once ----------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_parts = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        kind, emb = self.embed_eval(batch)
        self._eval_parts.setdefault(kind, []).append((batch["index"].cpu(), emb.float().cpu()))

    def on_validation_epoch_end(self) -> None:
        parts = {
            kind: (torch.cat([i for i, _ in p]), torch.cat([e for _, e in p]))
            for kind, p in self._eval_parts.items()
        }
        self._eval_parts = {}
        check_finite_embeddings(self, *(emb for _, emb in parts.values()))
        self.eval_metrics = self.score(parts)
        # every metric where callbacks read them (EarlyStopping on budget.metric), the primary one
        # also in the progress bar; the budget tracker logs them to MLflow
        for key, value in self.eval_metrics.items():
            prog_bar = key == self.primary_metric
            self.log(key, value, prog_bar=prog_bar, logger=False, rank_zero_only=True)
