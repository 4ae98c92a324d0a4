"""Text-to-image search: an open_clip dual encoder fine-tuned with the symmetric CLIP loss.

    python train.py task=text_image                       MiniLM + MobileNetV2 on Flickr8k
    python train.py -m task=text_image data.n=100,500,1000 trainer.max_epochs=1..10

After each validation `eval_metrics` holds {"val/mrr_at_20": ..., "val/i2t_hit_at_1": ...};
the budget tracker logs it. The unprefixed metrics are text-to-image (captions query images).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from open_clip.loss import ClipLoss

from finetune_budget.errors import ConfigError
from finetune_budget.metrics import retrieval_metrics
from finetune_budget.models.clip import build_clip
from finetune_budget.optim import (
    check_finite_embeddings,
    check_finite_loss,
    optimizer_with_schedule,
)

log = logging.getLogger(__name__)

# Upper bound of the learned temperature's inverse, as in CLIP and open_clip training.
MAX_LOGIT_SCALE = 100.0


def score_both_directions(
    texts: torch.Tensor,
    images: torch.Tensor,
    caption_image: torch.Tensor,
    top_k: int = 20,
    recall_at: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval metrics of both directions on the held-out split (see finetune_budget.metrics).

    texts: (C, D), images: (M, D), L2-normalised; caption_image: (C,) the image of each caption.
    val/<metric>: captions query images (text-to-image, the study's metric), with its cut-off
    metrics also as val/t2i_recall_at_<k> and val/t2i_hit_at_<k>; val/i2t_<metric>: images query
    captions (their 5 captions relevant), every metric. One relevant image per caption makes
    t2i recall@k = hit@k; for i2t, hit@k is what CLIP papers call R@k (recall@1 is at most 1/5).
    """
    image_ids = torch.arange(images.shape[0])
    t2i = retrieval_metrics(texts, images, caption_image, image_ids, top_k, recall_at)
    i2t = retrieval_metrics(images, texts, image_ids, caption_image, top_k, recall_at)
    out = {f"val/{k}": v for k, v in t2i.items()}
    out.update(
        {f"val/t2i_{k}": v for k, v in t2i.items() if k.startswith(("recall_at_", "hit_at_"))}
    )
    out.update({f"val/i2t_{k}": v for k, v in i2t.items()})
    return out


class ClipFineTuner(L.LightningModule):
    """Fine-tunes an open_clip model (see models/clip.py). Receives plain config values and builds
    its network itself.

    model: a CLIP `conf/model/*.yaml` as a dict; optim: optimizer (partial), schedule,
    warmup_steps and head_lr (learning rate of the projection heads and the temperature; null =
    the optimizer's lr); recall_at: the cut-offs of the per-direction recall metrics.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        top_k: int = 20,
        recall_at: tuple[int, ...] = (1, 5, 10),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        parts = build_clip(model)
        self.clip = parts.model
        self.parts = parts
        self.clip.train()
        self.loss_fn: ClipLoss | None = None
        self.eval_metrics: dict[str, float] = {}
        self._eval: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # -- the two encoders ------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, S, S) normalised -> (B, D) L2-normalised."""
        return self.clip.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) token ids -> (B, D) L2-normalised."""
        return self.clip.encode_text(tokens, normalize=True)

    def logit_scale(self) -> torch.Tensor:
        """exp of the learnable log-temperature, capped at MAX_LOGIT_SCALE (scalar)."""
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # -- training --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        # Under DDP every rank scores its queries against all ranks' features, gathered with
        # their gradients: 2 devices x batch B trains like 1 device x batch 2B.
        self.loss_fn = ClipLoss(
            local_loss=world > 1, gather_with_grad=world > 1, rank=rank, world_size=world
        )

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Symmetric InfoNCE over the batch's image-caption pairs (open_clip's ClipLoss)."""
        if self.loss_fn is None:
            self.setup("fit")
        image = self.encode_image(batch["image"])
        text = self.encode_text(batch["text"])
        return self.loss_fn(image, text, self.logit_scale())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        check_finite_loss(self, loss)
        n = batch["image"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/logit_scale", self.logit_scale().detach(), on_step=True, batch_size=n)
        return loss

    # -- evaluation: each held-out image and caption embedded once -------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval = {"image": [], "text": []}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if "image" in batch:
            emb = self.encode_image(batch["image"])
            self._eval["image"].append((batch["index"].cpu(), emb.float().cpu()))
        else:
            emb = self.encode_text(batch["text"])
            self._eval["text"].append((batch["index"].cpu(), emb.float().cpu()))

    @staticmethod
    def _stack(parts: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
        """Embeddings put back in item order: (n, D)."""
        index = torch.cat([i for i, _ in parts])
        emb = torch.cat([e for _, e in parts])
        out = torch.empty(n, emb.shape[1])
        out[index] = emb
        return out

    def on_validation_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        n_img, n_cap = dm.n_eval_images, len(dm.caption_image)
        seen_img = sum(len(i) for i, _ in self._eval["image"])
        seen_cap = sum(len(i) for i, _ in self._eval["text"])
        if seen_img != n_img or seen_cap != n_cap:
            raise ConfigError(
                f"evaluation saw {seen_img}/{n_img} images and {seen_cap}/{n_cap} captions; drop "
                "trainer.limit_val_batches and use data.eval_subset=<images> for a shorter eval"
            )
        images = self._stack(self._eval["image"], n_img)
        texts = self._stack(self._eval["text"], n_cap)
        self._eval = {}
        check_finite_embeddings(self, images, texts)
        self.eval_metrics = score_both_directions(
            texts, images, dm.caption_image, self.hparams.top_k, tuple(self.hparams.recall_at)
        )
        key = f"val/mrr_at_{self.hparams.top_k}"
        self.log(key, self.eval_metrics[key], prog_bar=True, logger=False, rank_zero_only=True)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.hparams.optim
        head_lr = cfg.get("head_lr")
        groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "no_decay": [], "head": []}
        for name, p in self.clip.named_parameters():
            if not p.requires_grad:
                continue
            is_head = name == "logit_scale" or ".proj" in name or "text_projection" in name
            if is_head and head_lr is not None:
                groups["head"].append(p)
            elif p.ndim < 2 or "norm" in name.lower() or ".bn" in name or "embedding" in name:
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
        param_groups = [
            {"params": groups["decay"]},
            {"params": groups["no_decay"], "weight_decay": 0.0},
        ]
        if groups["head"]:
            param_groups.append(
                {"params": groups["head"], "lr": float(head_lr), "weight_decay": 0.0}
            )
        return optimizer_with_schedule(self, cfg, param_groups)


def build_text_image(cfg: DictConfig):
    """TaskParts of `task=text_image`: the image-caption DataModule and a ClipFineTuner."""
    from omegaconf import OmegaConf

    from finetune_budget.data.image_text import ImageTextDataModule, load_image_text_data
    from finetune_budget.models.vision import image_transforms
    from finetune_budget.tasks import TaskParts

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    optim_cfg = OmegaConf.to_container(cfg.optim, resolve=True)
    data = load_image_text_data(data_cfg)
    module = ClipFineTuner(
        model=model_cfg,
        optim=optim_cfg,
        top_k=cfg.eval.top_k,
        recall_at=tuple(cfg.eval.get("recall_at", (1, 5, 10))),
    )
    p = module.parts
    size = int(model_cfg.get("image_size") or p.image_size)
    dm = ImageTextDataModule(
        data,
        p.tokenizer,
        train_transform=image_transforms(size, True, p.mean, p.std),
        eval_transform=image_transforms(size, False, p.mean, p.std),
        n=data_cfg["n"],
        subset_seed=data_cfg.get("subset_seed", cfg.seed),
        batch_size=data_cfg["batch_size"],
        eval_batch_size=cfg.eval.batch_size,
        num_workers=data_cfg.get("num_workers", 0),
        seed=cfg.seed,
    )
    log.info(
        "text_image: %d training pairs, %d held-out images, %d held-out captions",
        dm.n_train,
        dm.n_eval_images,
        len(dm.caption_image),
    )
    return TaskParts(dm, module, dm.n_train, p.random_heads)
