"""Dropout whose random masks cost a fifth of torch's on the CPU (`speed.fast_dropout`).

On the CPU torch draws a dropout mask element by element from its Mersenne Twister (`bernoulli_`,
about 10 ns an element, one thread): 19 masks per MiniLM training step, 10% of the step on the
2-core machine (docs/performance.md). Here each mask is drawn in one call of numpy's SFC64 bit
generator, 16 bits an element, seeded by one 64-bit draw from torch's generator: a mask costs
about a fifth as much, and runs stay reproducible by `seed` (and restartable from a saved torch RNG
state) as before.

The distribution is dropout's: an element is kept when its 16 random bits are below
t = round((1 - p) * 2^16), so with probability t / 2^16 (within 2^-17 of 1 - p), and a kept element
is scaled by 2^16 / t, so the expectation is exactly the input's. The random stream differs from
torch's, so a run's numbers move within seed-to-seed noise, not to the digit. On other devices
(CUDA's fused dropout is already fast) and in eval mode it is torch's own `F.dropout`.

`use_fast_dropout(transformer)` swaps a Hugging Face model's `nn.Dropout` modules and its attention
(the attention-probability dropout inside SDPA) for these; evaluation is unchanged to the bit.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BITS = 16
LEVELS = 1 << BITS
ATTENTION = "sdpa_fast_dropout"  # the attention implementation name registered in transformers


@functools.cache
def _half_bits(kept: int, dtype: torch.dtype) -> np.uint16:
    """The bit pattern of the scale 2^16 / kept rounded to `dtype` (bf16 or fp16), as torch
    rounds a float32 to it."""
    scale = torch.tensor(LEVELS / kept, dtype=torch.float32).to(dtype)
    return np.uint16(scale.view(torch.int16).item() & 0xFFFF)


def dropout_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A (shape) mask of 0 and 2^16 / t (t = round((1 - p) * 2^16) kept levels), seeded from
    torch's default CPU generator."""
    kept = round((1.0 - p) * LEVELS)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    count = int(np.prod(shape))
    words = np.random.SFC64(seed).random_raw(-(-count // 4))  # 4 x 16 bits a word
    bits = words.view(np.uint16)[:count]
    if dtype in (torch.bfloat16, torch.float16):  # the scale's half-precision bits, directly
        mask = np.multiply(bits < kept, _half_bits(kept, dtype), dtype=np.uint16)
        return torch.from_numpy(mask).view(dtype).view(shape)
    mask = np.multiply(bits < kept, np.float32(LEVELS / kept), dtype=np.float32)
    return torch.from_numpy(mask).view(shape).to(dtype)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)` with the cheap mask on the CPU."""
    if not training or p == 0.0 or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)
    if p == 1.0:
        return torch.zeros_like(x)
    return x * dropout_mask(x.shape, p, x.dtype)


class FastDropout(nn.Dropout):
    """nn.Dropout with `fast_dropout`'s masks (same `p`; `inplace` is not kept)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def attention_with_fast_dropout(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; while training on the CPU with attention dropout, the
    computation torch's SDPA runs there (its math path: scores, softmax, dropout, weighted
    values) with `fast_dropout`.

    query, key, value: (B, heads, T, d); attention_mask: (B, 1, T, T), True = attend, or None
    -> ((B, T, heads, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (
        not dropout
        or query.device.type != "cpu"
        or getattr(module, "is_causal", False)
        or key.shape[1] != query.shape[1]  # grouped key/value heads
        or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "cache"))
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True = attend
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    weights = fast_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register `ATTENTION` with transformers (SDPA's masks), once per process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, attention_with_fast_dropout)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def use_fast_dropout(transformer: nn.Module) -> nn.Module:
    """Swap the model's nn.Dropout modules for FastDropout and, where it runs SDPA attention,
    its attention for `attention_with_fast_dropout`. Returns the model."""
    for sub in transformer.modules():
        if type(sub) is nn.Dropout:
            sub.__class__ = FastDropout
    config = getattr(transformer, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa":
        register_attention()
        config._attn_implementation = ATTENTION
    return transformer
