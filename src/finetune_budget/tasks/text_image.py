"""Text-to-image search (task=text_image): an open_clip dual encoder fine-tuned with the
symmetric CLIP loss.

    python train.py task=text_image                       MiniLM + MobileNetV2 on Flickr8k
    python train.py -m task=text_image data.n=100,500,1000 trainer.max_epochs=1..10

After each validation `eval_metrics` holds {"val/mrr_at_20": ..., "val/i2t_hit_at_1": ...};
the budget tracker logs it. The unprefixed metrics are text-to-image (captions query images).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from finetune_budget.errors import ConfigError
from finetune_budget.models.clip import build_clip
from finetune_budget.retrieval.metrics import retrieval_metrics
from finetune_budget.tasks.module import FineTuner
from finetune_budget.tasks.task import TaskParts

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
    """Retrieval metrics of both directions on the held-out split (see retrieval.metrics).

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


class ClipFineTuner(FineTuner):
    """Fine-tunes an open_clip model (see models/clip.py). Receives plain config values and builds
    its network itself.

    model: a CLIP `conf/model/*.yaml` as a dict; optim: optimizer (partial), schedule,
    warmup_steps and head_lr (learning rate of the projection heads and the temperature; null =
    the optimizer's lr); recall_at: the cut-offs of the per-direction recall metrics.
    Batches: {"image": (B, 3, S, S), "text": (B, T) token ids, "index"}; held-out batches hold
    one kind, {"image", "index"} or {"text", "index"}.
    """

    loss_name = "clip"

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

    # -- batch format ----------------------------------------------------------------------------
    def embed_train(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "images": self.encode_image(batch["image"]),
            "texts": self.encode_text(batch["text"]),
            "logit_scale": self.logit_scale(),
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        n = len(batch["index"])
        self.log("train/logit_scale", self.logit_scale().detach(), on_step=True, batch_size=n)
        return loss

    def embed_eval(self, batch: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
        if "image" in batch:
            return "image", self.encode_image(batch["image"])
        return "text", self.encode_text(batch["text"])

    # -- evaluation: each held-out image and caption embedded once -------------------------------
    @staticmethod
    def _stack(index: torch.Tensor, emb: torch.Tensor, n: int) -> torch.Tensor:
        """Embeddings put back in item order: (n, D)."""
        out = torch.empty(n, emb.shape[1])
        out[index] = emb
        return out

    def score(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        dm = self.trainer.datamodule
        n_img, n_cap = dm.n_eval_images, len(dm.caption_image)
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, 1))
        (img_i, img_e), (cap_i, cap_e) = parts.get("image", empty), parts.get("text", empty)
        if len(img_i) != n_img or len(cap_i) != n_cap:
            raise ConfigError(
                f"evaluation saw {len(img_i)}/{n_img} images and {len(cap_i)}/{n_cap} captions; "
                "drop trainer.limit_val_batches and use data.eval_subset=<images> for a shorter "
                "eval"
            )
        images = self._stack(img_i, img_e, n_img).to(self.device)  # scored on the device
        texts = self._stack(cap_i, cap_e, n_cap).to(self.device)
        return score_both_directions(
            texts, images, dm.caption_image, self.hparams.top_k, tuple(self.hparams.recall_at)
        )

    # -- optimisation ----------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Decayed weights, biases/norms without decay, and the heads at optim.head_lr."""
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
        return param_groups


def build(cfg: DictConfig, **_: Any) -> TaskParts:
    """TaskParts of `task=text_image`: the image-caption DataModule and a ClipFineTuner (the
    task group's own keys, name and modality, are read where runs are tagged)."""
    from omegaconf import OmegaConf

    from finetune_budget.data.base import build_datamodule
    from finetune_budget.data.image_text import ImageTextDataModule
    from finetune_budget.models.vision import image_transforms

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    module = ClipFineTuner(
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        top_k=cfg.eval.top_k,
        recall_at=tuple(cfg.eval.recall_at),
    )
    p = module.parts
    size = p.image_size
    dm = build_datamodule(
        cfg.data,
        ImageTextDataModule,
        "data=flickr8k",
        data=None,
        tokenizer=p.tokenizer,
        train_transform=image_transforms(size, True, p.mean, p.std),
        eval_transform=image_transforms(size, False, p.mean, p.std),
        eval_batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
    )
    log.info(
        "text_image: %d training pairs, %d held-out images, %d held-out captions",
        dm.n_train,
        dm.n_eval_images,
        len(dm.caption_image),
    )
    return TaskParts(dm, module, dm.n_train, p.random_heads)
