"""Retrieval metrics over the top k, on the candidates that matter.

Every query's ranked list holds its top-k items plus all its other relevant items (ranked after
the top k). That is exactly what the metrics below read, so the result equals the metrics of the
full N x N score matrix while memory stays O(N * (k + relevant)).

Per query with R relevant items and hits h_1..h_k (1 = relevant) in rank order, then averaged over
the queries with R > 0 (BEIR / MTEB / sentence-transformers' InformationRetrievalEvaluator):

    mrr_at_k       1 / rank of the first hit in the top k (0 if none)
    recall_at_k    (hits in the top k) / R
    hit_at_k       1 if any hit in the top k else 0 (what CLIP papers call R@k)
    map_at_k       sum_i h_i * precision@i / min(k, R)
    map_hits_at_k  sum_i h_i * precision@i / (hits in the top k): torchmetrics' RetrievalMAP, the
                   convention of the reference study's table (it can fall when a hit is added)
    ndcg_at_k      sum_i h_i / log2(i + 1), divided by its value for the ideal ranking

torchmetrics computes all but map_at_k (it has no min(k, R) option); map_at_k is vectorised here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchmetrics.retrieval import (
    RetrievalHitRate,
    RetrievalMAP,
    RetrievalMRR,
    RetrievalNormalizedDCG,
    RetrievalRecall,
)

# Bump when a metric's definition changes: it is part of the epoch-0 baseline cache key.
# 2: map_at_k divides by min(k, R); the old map_at_k is map_hits_at_k; hit_at_k added.
METRICS_VERSION = 2


def _metric_set(top_k: int, recall_at: tuple[int, ...]) -> dict[str, object]:
    skip = {"empty_target_action": "skip"}
    metrics: dict[str, object] = {
        f"mrr_at_{top_k}": RetrievalMRR(top_k=top_k, **skip),
        f"recall_at_{top_k}": RetrievalRecall(top_k=top_k, **skip),
        f"map_hits_at_{top_k}": RetrievalMAP(top_k=top_k, **skip),
        f"ndcg_at_{top_k}": RetrievalNormalizedDCG(top_k=top_k, **skip),
    }
    for k in recall_at:
        if k < top_k:
            metrics[f"recall_at_{k}"] = RetrievalRecall(top_k=k, **skip)
            metrics[f"hit_at_{k}"] = RetrievalHitRate(top_k=k, **skip)
    return metrics


class Candidates(NamedTuple):
    """Each query's top k plus its remaining relevant items, flat, as torchmetrics reads them.

    scores, targets, query_ids: (M,) with M = Q * k + relevant items outside the top k;
    top_hits: (Q, k) bool, the relevance of each query's top k in rank order;
    n_relevant: (Q,) number of relevant gallery items of each query.
    """

    scores: torch.Tensor
    targets: torch.Tensor
    query_ids: torch.Tensor
    top_hits: torch.Tensor
    n_relevant: torch.Tensor


@torch.no_grad()
def candidate_lists(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    relevant: torch.Tensor,
    top_k: int,
    exclude_self: bool,
    chunk_size: int = 1024,
) -> Candidates:
    """The candidates of every query (see Candidates).

    queries: (Q, D), gallery: (G, D), L2-normalised; relevant: (Q, G) bool.
    exclude_self: query i is gallery item i and is not its own result (Q == G).
    """
    k = min(top_k, gallery.shape[0] - int(exclude_self))
    scores_out, targets_out, ids_out, hits_out, n_rel_out = [], [], [], [], []
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
        hits_out.append(top_rel)
        n_rel_out.append(rel.sum(dim=1))
    return Candidates(
        torch.cat(scores_out),
        torch.cat(targets_out),
        torch.cat(ids_out),
        torch.cat(hits_out),
        torch.cat(n_rel_out),
    )


def average_precision_at_k(
    top_hits: torch.Tensor, n_relevant: torch.Tensor, k: int
) -> torch.Tensor:
    """AP@k per query: sum_i h_i * precision@i / min(k, R).

    top_hits: (Q, k') bool in rank order (k' <= k when the gallery is smaller than k);
    n_relevant: (Q,) R. Returns (Q,) float (0 where R = 0).
    """
    hits = top_hits.float()
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)
    precision_sum = (hits.cumsum(dim=1) / ranks * hits).sum(dim=1)
    return precision_sum / n_relevant.clamp(max=k).clamp(min=1).float()


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
    Queries without any relevant item are skipped. Returns {"mrr_at_20": ..., "map_at_20": ...,
    "hit_at_1": ..., ...} (definitions in the module docstring).
    """
    exclude_self = gallery is None
    if gallery is None:
        gallery, gallery_groups = queries, query_groups
    assert query_groups is not None and gallery_groups is not None
    relevant = query_groups[:, None].cpu() == gallery_groups[None, :].cpu()
    cand = candidate_lists(queries.cpu(), gallery.cpu(), relevant, top_k, exclude_self, chunk_size)
    # torchmetrics (1.9) counts a relevant item only if its score is > 0; cosine scores can be
    # negative (a near-chance model), so shift them all above 0: ranks do not change.
    scores = cand.scores - cand.scores.min() + 1.0
    out = {}
    for name, metric in _metric_set(top_k, recall_at).items():
        out[name] = float(metric(scores, cand.targets, indexes=cand.query_ids))
    answered = cand.n_relevant > 0
    ap = average_precision_at_k(cand.top_hits[answered], cand.n_relevant[answered], top_k)
    out[f"map_at_{top_k}"] = float(ap.mean()) if len(ap) else 0.0
    return _ordered(out, top_k)


def _ordered(out: dict[str, float], top_k: int) -> dict[str, float]:
    """Keys in reading order: the @top_k metrics first, then the cut-offs."""
    first = [f"{m}_at_{top_k}" for m in ("mrr", "recall", "map", "map_hits", "ndcg")]
    return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}
