"""Retrieval metrics over the top k, computed with torchmetrics on the candidates that matter.

Every query's ranked list holds its top-k items plus all its other relevant items (ranked after
the top k). That is exactly what mRR@k, mAP@k, nDCG@k and recall@k read, so the result equals
torchmetrics on the full N x N score matrix while memory stays O(N * (k + relevant)).
"""

from __future__ import annotations

import torch
from torchmetrics.retrieval import (
    RetrievalMAP,
    RetrievalMRR,
    RetrievalNormalizedDCG,
    RetrievalRecall,
)


def _metric_set(top_k: int, recall_at: tuple[int, ...]) -> dict[str, object]:
    metrics: dict[str, object] = {
        f"mrr_at_{top_k}": RetrievalMRR(top_k=top_k, empty_target_action="skip"),
        f"recall_at_{top_k}": RetrievalRecall(top_k=top_k, empty_target_action="skip"),
        f"map_at_{top_k}": RetrievalMAP(top_k=top_k, empty_target_action="skip"),
        f"ndcg_at_{top_k}": RetrievalNormalizedDCG(top_k=top_k, empty_target_action="skip"),
    }
    for k in recall_at:
        if k < top_k:
            metrics[f"recall_at_{k}"] = RetrievalRecall(top_k=k, empty_target_action="skip")
    return metrics


@torch.no_grad()
def candidate_lists(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    relevant: torch.Tensor,
    top_k: int,
    exclude_self: bool,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat (scores, targets, query_ids) over each query's top-k plus its remaining relevant items.

    queries: (Q, D), gallery: (G, D), L2-normalised; relevant: (Q, G) bool.
    exclude_self: query i is gallery item i and is not its own result (Q == G).
    """
    k = min(top_k, gallery.shape[0] - int(exclude_self))
    scores_out, targets_out, ids_out = [], [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start : start + chunk_size].float()
        sims = q @ gallery.float().T
        rel = relevant[start : start + chunk_size].clone()
        rows = torch.arange(q.shape[0])
        if exclude_self:
            sims[rows, rows + start] = float("-inf")
            rel[rows, rows + start] = False
        top_scores, top_idx = sims.topk(k, dim=1)
        top_rel = rel.gather(1, top_idx)
        # relevant items outside the top k: scored below every top-k item
        rest = rel.clone()
        rest.scatter_(1, top_idx, False)
        q_ids = rest.nonzero(as_tuple=True)[0]
        floor = top_scores[:, -1:] - 1.0
        scores_out += [top_scores.flatten(), floor[q_ids, 0]]
        targets_out += [top_rel.flatten(), torch.ones_like(q_ids, dtype=torch.bool)]
        ids_out += [(rows + start).repeat_interleave(k), q_ids + start]
    return torch.cat(scores_out), torch.cat(targets_out), torch.cat(ids_out)


def retrieval_metrics(
    queries: torch.Tensor,
    gallery: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    gallery_groups: torch.Tensor | None = None,
    top_k: int = 20,
    recall_at: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Metrics of retrieving `gallery` items with `queries`; same group = relevant.

    With gallery=None each query searches all other queries (itself excluded).
    queries: (Q, D), gallery: (G, D), L2-normalised; *_groups: (Q,), (G,) integer ids.
    Queries without any relevant item are skipped. Returns {"mrr_at_20": ..., ...}.
    """
    exclude_self = gallery is None
    if gallery is None:
        gallery, gallery_groups = queries, query_groups
    assert query_groups is not None and gallery_groups is not None
    relevant = query_groups[:, None].cpu() == gallery_groups[None, :].cpu()
    scores, targets, ids = candidate_lists(
        queries.cpu(), gallery.cpu(), relevant, top_k, exclude_self, chunk_size
    )
    # torchmetrics (1.9) counts a relevant item only if its score is > 0; cosine scores can be
    # negative (a near-chance model), so shift them all above 0: ranks do not change.
    scores = scores - scores.min() + 1.0
    out = {}
    for name, metric in _metric_set(top_k, recall_at).items():
        out[name] = float(metric(scores, targets, indexes=ids))
    return out
