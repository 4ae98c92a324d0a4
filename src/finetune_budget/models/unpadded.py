"""BERT without its padding (`speed.unpadded_encoder`): every per-token layer of the encoder
(embeddings, query/key/value and output projections, feed-forward, layer norms, dropout) runs on
the batch's real tokens only, packed as (N, hidden); attention alone sees the padded
(B, heads, T, d) layout.

The modules are the Hugging Face model's own (same weights, state dict, `save_pretrained`), called
in the order `BertModel.forward` calls them, with the position ids it uses (`arange(T)` per row,
so right or left padding alike). Padding rows never influence a real token in BERT (their keys are
masked), so the real tokens' hidden states equal the padded model's up to float rounding; what
is saved is the padding's share of the FLOPs (a quarter of a CLINC150 training batch's tokens
after length bucketing, docs/performance.md). The real tokens are followed by a few copies of the
first one, up to `row_count`, so that a run meets few matrix shapes (see there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from finetune_budget.models.dropout import ATTENTION


def row_count(tokens: int) -> int:
    """The rows the per-token layers run on for `tokens` real tokens: rounded up to a multiple of
    16, or of a 32nd of the power of two above where that is more (at most 16 counts per doubling).

    On the CPU oneDNN builds a kernel (a "primitive", JIT-compiled) for each matrix shape it has
    not met and keeps the last 1024. A batch's real-token count is a new shape nearly every step,
    and each builds a dozen (a BERT layer's products forward and backward), each a compilation
    (docs/performance.md has the cost). Rounded, a run's few shapes stay built, for 1-3% more
    rows."""
    step = max(16, 1 << max(tokens.bit_length() - 5, 0))
    return -(-tokens // step) * step


def unpadded_unsupported(transformer: nn.Module) -> str | None:
    """Why `transformer` cannot run unpadded here, or None when it can."""
    if type(transformer) is not BertModel:
        return f"{type(transformer).__name__} is not a BertModel"
    config = transformer.config
    if config.is_decoder or config.add_cross_attention:
        return "the BERT is a decoder"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={config.position_embedding_type}"
    if getattr(config, "chunk_size_feed_forward", 0):
        return f"chunk_size_feed_forward={config.chunk_size_feed_forward}"
    implementation = config._attn_implementation
    if implementation not in ("sdpa", ATTENTION) or implementation not in ALL_ATTENTION_FUNCTIONS:
        return f"attention implementation {implementation!r} (sdpa is needed)"
    return None


def unpadded_hidden_states(
    bert: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask -> the last layer's hidden states of the real tokens, (N, hidden) in
    row-major order, and each one's row in the batch, (N,)."""
    batch, length = input_ids.shape
    config = bert.config
    heads = config.num_attention_heads
    real = attention_mask.reshape(-1) != 0
    keep = real.nonzero().squeeze(1)  # real tokens' flat positions
    tokens = len(keep)
    # the rows the per-token layers run on: the real tokens, then copies of the first one up to
    # row_count (never attended to, their results dropped: their gradients are zero)
    rows = torch.cat([keep, keep[:1].expand(row_count(tokens) - tokens)])
    pads = (~real).nonzero().squeeze(1)
    positions = rows % length
    emb = bert.embeddings
    x = emb.word_embeddings(input_ids.reshape(-1).index_select(0, rows))
    x = x + emb.token_type_embeddings(torch.zeros_like(positions))
    x = emb.dropout(emb.LayerNorm(x + emb.position_embeddings(positions)))
    attend = ALL_ATTENTION_FUNCTIONS[config._attn_implementation]
    mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): True = attend
    for layer in bert.encoder.layer:
        self_attention = layer.attention.self
        projections = (self_attention.query, self_attention.key, self_attention.value)
        biases = [p.bias for p in projections]
        qkv = F.linear(  # one product against the three weights (their gradients flow back)
            x,
            torch.cat([p.weight for p in projections]),
            None if any(b is None for b in biases) else torch.cat(biases),
        )
        # a fresh buffer: zeros in the padding rows only (attention masks their keys, but their
        # values must be finite), the real rows copied in place (no zeroed copy of the whole)
        padded = qkv.new_empty(batch * length, qkv.shape[1]).index_fill_(0, pads, 0.0)
        padded.index_copy_(0, keep, qkv[:tokens])
        q, k, v = padded.view(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out, _ = attend(
            self_attention,
            q,
            k,
            v,
            mask,
            dropout=self_attention.dropout.p if self_attention.training else 0.0,
            scaling=self_attention.scaling,
        )  # (B, T, heads, d)
        attended = out.reshape(batch * length, -1).index_select(0, rows)
        attention_out, feed_forward_out = layer.attention.output, layer.output
        x_attended = attention_out.LayerNorm(
            attention_out.dropout(attention_out.dense(attended)) + x
        )
        hidden = feed_forward_out.dense(layer.intermediate(x_attended))
        x = feed_forward_out.LayerNorm(feed_forward_out.dropout(hidden) + x_attended)
    return x[:tokens], keep // length


def pool_unpadded(
    tokens: torch.Tensor, rows: torch.Tensor, batch: int, pooling: str
) -> torch.Tensor:
    """(N, hidden) real tokens and their rows -> (B, hidden): their mean ("mean"), or each row's
    first real token ("cls": the [CLS] under right padding)."""
    counts = torch.bincount(rows, minlength=batch)
    if pooling == "cls":
        first = torch.cumsum(counts, 0) - counts
        return tokens.index_select(0, first)
    sums = tokens.new_zeros(batch, tokens.shape[1]).index_add(0, rows, tokens)
    return sums / counts.clamp(min=1).unsqueeze(1).to(tokens.dtype)
