"""Text-to-text search (task=text_text): a sentence encoder fine-tuned on labelled texts
(supervised contrastive over class-aware batches) or on pairs (in-batch-negatives InfoNCE);
held-out texts query each other, same label or group = relevant.

    python train.py                                     MiniLM on CLINC150
    python train.py -m data.n=100,500,1000 trainer.max_epochs=1..10

After each validation, `eval_metrics` holds {"val/mrr_at_20": ...}; the budget tracker logs it.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from finetune_budget.errors import ConfigError
from finetune_budget.models.build import build_model
from finetune_budget.retrieval.matryoshka import truncation_dims
from finetune_budget.tasks.module import FineTuner, pick_loss
from finetune_budget.tasks.task import TaskParts, plain


class EmbeddingFineTuner(FineTuner):
    """Fine-tunes a sentence encoder; gets plain config values and builds its network itself.

    Batches: labels {"input": tokenised (B, T), "labels": (B,), "index"}, pairs {"query",
    "positive": tokenised (B, T), "index"}; held-out {"input", "index"}."""

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
        self.encoder = build_model(model)  # models.text.build_sentence_encoder
        self.encoder.train()  # pretrained weights load in eval mode; fine-tuning uses dropout
        self.loss_name = pick_loss(loss["name"], data_kind)
        self.matryoshka_dims = truncation_dims(loss.get("matryoshka_dims"), self.encoder.dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**batch)

    def embed_train(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.loss_name == "infonce":
            return {"queries": self(batch["query"]), "positives": self(batch["positive"])}
        return {"embeddings": self(batch["input"]), "labels": batch["labels"]}

    def embed_eval(self, batch: dict[str, Any]) -> tuple[str, torch.Tensor]:
        return "items", self(batch["input"])


def build(cfg: DictConfig, **_: Any) -> TaskParts:
    """TaskParts of task=text_text from the composed config (the task group's own keys, name
    and modality, are read where runs are tagged)."""
    from finetune_budget.data.base import build_datamodule
    from finetune_budget.data.text_datamodule import TextRetrievalDataModule
    from finetune_budget.models.text import load_tokenizer
    from finetune_budget.retrieval.probes import attach_eval_hooks

    model_cfg = plain(cfg.model)
    if model_cfg.get("family") != "sentence_encoder":
        raise ConfigError(
            f"task=text_text needs a sentence encoder, got model={model_cfg.get('name')}; use "
            "model=minilm_l6 (or mpnet_base, hub_sentence_encoder, tiny_bert)"
        )
    tokenizer = load_tokenizer(model_cfg["tokenizer"])
    dm = build_datamodule(
        cfg.data,
        TextRetrievalDataModule,
        "data=clinc150, stsb, flickr8k_captions or custom_text",
        tokenizer=tokenizer,
        max_length=model_cfg["max_length"],
        eval_batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
    )
    module = EmbeddingFineTuner(
        model=model_cfg,
        loss=plain(cfg.loss),
        optim=plain(cfg.optim),
        data_kind=dm.data.kind,
        top_k=cfg.eval.top_k,
    )
    attach_eval_hooks(module, cfg, tokenizer)  # eval.truncate_dims, eval.pair_probe (optional)
    random_parts = model_cfg["pretrained"] is None or bool(model_cfg["output_dim"])
    return TaskParts(dm, module, dm.n_train, random_parts)
