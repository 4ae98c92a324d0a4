"""Matryoshka-style embeddings: the loss summed over truncations, retrieval at several truncations.

    python train.py loss.matryoshka_dims=[64,128,256]              # trains and evaluates each size
    python train.py model.output_dim=256 eval.truncate_dims=[64,128]   # evaluation only

A truncation to d keeps the first d dimensions and L2-normalises again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from finetune_budget.errors import ConfigError
from finetune_budget.retrieval.metrics import retrieval_metrics


def truncation_dims(
    dims: Sequence[int] | None, full: int, what: str = "loss.matryoshka_dims"
) -> tuple[int, ...]:
    """Sorted distinct dims, each in [1, full]; () when `dims` is empty or null."""
    if not dims:
        return ()
    out = sorted({int(d) for d in dims})
    if out[0] < 1 or out[-1] > full:
        raise ConfigError(
            f"{what}={list(dims)} must lie between 1 and the embedding size {full} "
            "(model.output_dim or the model's hidden size)"
        )
    return tuple(out)


def truncate(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """emb: (B, D) -> (B, dim), the first `dim` dimensions, L2-normalised."""
    return F.normalize(emb[..., :dim], dim=-1)


def matryoshka_loss(
    loss_fn: Callable[..., torch.Tensor], embeddings: Sequence[torch.Tensor], dims: Sequence[int]
) -> torch.Tensor:
    """loss_fn(*embeddings) when dims is empty, else the sum over d in dims and the full size of
    loss_fn(*(each embedding truncated to d)). embeddings: each (B, D)."""
    if not dims:
        return loss_fn(*embeddings)
    full = embeddings[0].shape[-1]
    sizes = sorted({*dims, full})
    return sum(loss_fn(*(truncate(e, d) for e in embeddings)) for d in sizes)


class TruncationEval:
    """Evaluation hook: retrieval metrics of the held-out embeddings truncated to each dim,
    `val/<metric>_dim<d>` (e.g. `val/mrr_at_20_dim64`)."""

    def __init__(self, dims: Sequence[int], top_k: int = 20) -> None:
        self.dims = tuple(dims)
        self.top_k = top_k

    def __call__(self, module: Any, emb: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in self.dims:
            if d >= emb.shape[-1]:
                continue
            scores = retrieval_metrics(truncate(emb, d), query_groups=groups, top_k=self.top_k)
            out.update({f"val/{k}_dim{d}": v for k, v in scores.items()})
        return out
