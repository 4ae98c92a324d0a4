"""Contrastive losses with in-batch negatives; under DDP they see every device's negatives.

Features are gathered with their gradients (torch.distributed.nn.functional.all_gather), so a run
on 2 devices with per-device batch B computes the loss of one batch of 2B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, ...) on each rank -> (world*B, ...) on every rank, and this rank's offset in it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def _gather_plain(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _mean_over_all_ranks(per_anchor: torch.Tensor, all_emb: torch.Tensor) -> torch.Tensor:
    """Mean of the per-anchor losses (A,) over the anchors of every rank.

    Each rank returns sum(here) * world / count(all ranks); DDP averages the gradients over ranks,
    so training equals one process with the whole batch even when ranks have different numbers
    of valid anchors. With no valid anchor anywhere the loss is 0, still connected to the gathered
    features so that every rank runs the same collectives in backward.
    """
    count = torch.tensor(float(per_anchor.numel()), device=per_anchor.device)
    world = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        dist.all_reduce(count)
    if count.item() == 0:
        return all_emb.sum() * 0.0
    return per_anchor.sum() * world / count


def info_nce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    temperature: float = 0.05,
    symmetric: bool = False,
) -> torch.Tensor:
    """MultipleNegativesRanking: query i's positive is positives[i], other positives are negatives.

    queries, positives: (B, D), L2-normalised.
    """
    all_pos, offset = gather_with_grad(positives)
    targets = torch.arange(queries.shape[0], device=queries.device) + offset
    logits = queries @ all_pos.T / temperature
    loss = F.cross_entropy(logits.float(), targets)
    if symmetric:
        all_q, _ = gather_with_grad(queries)
        loss = (loss + F.cross_entropy((positives @ all_q.T / temperature).float(), targets)) / 2
    return loss


def supervised_contrastive(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """SupCon (Khosla et al. 2020): each anchor pulls all same-label items, pushes the rest.

    embeddings: (B, D) L2-normalised; labels: (B,). Anchors without a positive are skipped.
    """
    all_emb, offset = gather_with_grad(embeddings)
    all_labels = _gather_plain(labels)
    n = embeddings.shape[0]
    logits = (embeddings @ all_emb.T / temperature).float()
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(n), torch.arange(n) + offset] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = (labels[:, None] == all_labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = positive.sum(1)
    has_pos = n_pos > 0  # anchors without a positive in the (gathered) batch are skipped
    mean_log_prob = log_prob.masked_fill(~positive, 0.0).sum(1)[has_pos] / n_pos[has_pos]
    return _mean_over_all_ranks(-mean_log_prob, all_emb)


def batch_hard_triplet(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """Triplet loss with the hardest positive and negative of each anchor (cosine distance)."""
    all_emb, offset = gather_with_grad(embeddings)
    all_labels = _gather_plain(labels)
    dist_ = 1.0 - (embeddings @ all_emb.T).float()
    n = embeddings.shape[0]
    same = labels[:, None] == all_labels[None, :]
    self_mask = torch.zeros_like(same)
    self_mask[torch.arange(n), torch.arange(n) + offset] = True
    pos = same & ~self_mask
    has_pos, has_neg = pos.any(1), (~same).any(1)
    valid = has_pos & has_neg
    hardest_pos = dist_.masked_fill(~pos, float("-inf")).amax(1)
    hardest_neg = dist_.masked_fill(same, float("inf")).amin(1)
    return _mean_over_all_ranks(F.relu(hardest_pos - hardest_neg + margin)[valid], all_emb)
