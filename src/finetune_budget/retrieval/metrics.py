"""Retrieval metrics over the top k, from each query's top-k hits alone.

Every metric below reads only each query's top-k hits and its number of relevant items R, so the
result equals the metrics of the full N x N score matrix while memory stays O(N * k) (the scores
are computed a chunk of queries at a time).

Per query with R relevant items and hits h_1..h_k (1 = relevant) in rank order, then averaged over
the queries with R > 0 (BEIR / MTEB / sentence-transformers' InformationRetrievalEvaluator):

    mrr_at_k       1 / rank of the first hit in the top k (0 if none)
    recall_at_k    (hits in the top k) / R
    hit_at_k       1 if any hit in the top k else 0 (what CLIP papers call R@k)
    map_at_k       sum_i h_i * precision@i / min(k, R)
    map_hits_at_k  sum_i h_i * precision@i / (hits in the top k): torchmetrics' RetrievalMAP, the
                   convention of the reference study's table (it can fall when a hit is added)
    ndcg_at_k      sum_i h_i / log2(i + 1), divided by its value for the ideal ranking

Ties within the top k (identical embeddings) rank in `torch.topk`'s order, for every metric.
Scores are computed on the embeddings' device, a chunk of queries at a time (`chunk_rows`), and
relevance only for the top k, from the groups: no (Q, G) tensor is ever made.
All are computed at once from each query's (k,) hits and R: torchmetrics' retrieval metrics (the
test oracle, tests/test_metrics.py) loop over the queries in Python, 3.4-3.9 s of CLINC150's ~10 s
evaluation of 3,000 queries on a 2-core CPU and most of it on a GPU; this takes milliseconds.
"""

from __future__ import annotations

import torch

# Bump when a metric's definition changes: it is part of the epoch-0 baseline cache key.
# 2: map_at_k divides by min(k, R); the old map_at_k is map_hits_at_k; hit_at_k added.
# 3: from the top-k hits directly (torchmetrics before: it averages nDCG over tied scores).
METRICS_VERSION = 3


# The most memory one chunk of queries' (chunk, G) float32 scores may take on the CPU; on a GPU,
# a quarter of the free device memory. 100,000 held-out items: 671 queries a chunk, about 0.3 GB
# in all (bench/bench_eval_scale.py), where a (Q, G) relevance matrix alone took 10 GB.
SCORES_MB = 256


def chunk_rows(n_gallery: int, device: torch.device, scores_mb: float | None = None) -> int:
    """Queries scored at once so that their (chunk, n_gallery) float32 scores stay within
    `scores_mb` (default: SCORES_MB on the CPU, a quarter of the free memory on a GPU)."""
    if scores_mb is not None:
        budget = scores_mb * 2**20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = (free + cached) / 4
    else:
        budget = SCORES_MB * 2**20
    return max(1, int(budget // (4 * max(n_gallery, 1))))


def relevant_counts(
    query_groups: torch.Tensor, gallery_groups: torch.Tensor, exclude_self: bool
) -> torch.Tensor:
    """(Q,): the number of gallery items in each query's group (less the query itself when
    exclude_self), from the gallery's group sizes. *_groups: (Q,), (G,) ids."""
    dtype = torch.promote_types(query_groups.dtype, gallery_groups.dtype)
    query_groups = query_groups.to(dtype)
    ids, sizes = torch.unique(gallery_groups.to(dtype), return_counts=True)  # ids sorted
    if ids.numel() == 0:
        return torch.zeros(query_groups.shape, dtype=torch.long, device=query_groups.device)
    at = torch.searchsorted(ids, query_groups).clamp(max=ids.numel() - 1)
    counts = torch.where(ids[at] == query_groups, sizes[at], 0)
    return counts - int(exclude_self)


@torch.no_grad()
def top_k_hits(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_groups: torch.Tensor,
    gallery_groups: torch.Tensor,
    top_k: int,
    exclude_self: bool,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, k) bool: the relevance of each query's top k in rank order; (Q,): its number of
    relevant gallery items R. Scored on the embeddings' device a chunk of queries at a time
    (chunk_size, default from `chunk_rows`); no (Q, G) tensor is made.

    queries: (Q, D), gallery: (G, D), L2-normalised; *_groups: (Q,), (G,) ids, same = relevant.
    exclude_self: query i is gallery item i and is not its own result (Q == G).
    """
    device = queries.device
    gallery = gallery.to(device).float()
    query_groups, gallery_groups = query_groups.to(device), gallery_groups.to(device)
    k = min(top_k, gallery.shape[0] - int(exclude_self))
    step = chunk_size or chunk_rows(gallery.shape[0], device)
    hits_out = []
    # one buffer for every chunk's scores: a fresh 256 MB a chunk costs page faults (CPU)
    buffer = torch.empty(min(step, queries.shape[0]), gallery.shape[0], device=device)
    for start in range(0, queries.shape[0], step):
        q = queries[start : start + step].float()
        sims = torch.mm(q, gallery.T, out=buffer[: q.shape[0]])
        if exclude_self:
            rows = torch.arange(q.shape[0], device=device)
            sims[rows, rows + start] = float("-inf")
        top_idx = sims.topk(k, dim=1).indices
        # scored -inf and k <= G - 1, the query itself is never among its own top k
        hits_out.append(gallery_groups[top_idx] == query_groups[start : start + step, None])
    n_rel = relevant_counts(query_groups, gallery_groups, exclude_self)
    if not hits_out:
        return torch.zeros(0, max(k, 0), dtype=torch.bool, device=device), n_rel
    return torch.cat(hits_out), n_rel


def retrieval_metrics(
    queries: torch.Tensor,
    gallery: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    gallery_groups: torch.Tensor | None = None,
    top_k: int = 20,
    recall_at: tuple[int, ...] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Metrics of retrieving `gallery` items with `queries`; same group = relevant.

    With gallery=None each query searches all other queries (itself excluded).
    queries: (Q, D), gallery: (G, D), L2-normalised; *_groups: (Q,), (G,) integer ids.
    Scored on the queries' device, in chunks of `chunk_size` queries (default: see `chunk_rows`).
    Queries without any relevant item are skipped. Returns {"mrr_at_20": ..., "map_at_20": ...,
    "hit_at_1": ..., ...} (definitions in the module docstring).
    """
    exclude_self = gallery is None
    if gallery is None:
        gallery, gallery_groups = queries, query_groups
    assert query_groups is not None and gallery_groups is not None
    all_hits, all_r = top_k_hits(
        queries, gallery, query_groups, gallery_groups, top_k, exclude_self, chunk_size
    )
    names = [f"{m}_at_{top_k}" for m in ("mrr", "recall", "map", "map_hits", "ndcg")]
    names += [f"{m}_at_{c}" for c in recall_at if c < top_k for m in ("recall", "hit")]
    answered = all_r > 0
    if not bool(answered.any()):
        return dict.fromkeys(names, 0.0)
    hits, n_rel = all_hits[answered].float(), all_r[answered]  # (Q, k') in rank order; R
    r = n_rel.float()
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32, device=hits.device)
    found = hits.sum(dim=1)
    first = hits.argmax(dim=1).float() + 1  # rank of the first hit (where there is one)
    precision_sum = (hits.cumsum(dim=1) / ranks * hits).sum(dim=1)
    gains = 1.0 / torch.log2(ranks + 1)
    ideal = gains.cumsum(dim=0)[n_rel.clamp(max=hits.shape[1]) - 1]  # R hits at ranks 1..R
    out = {
        f"mrr_at_{top_k}": torch.where(found > 0, 1.0 / first, 0.0),
        f"recall_at_{top_k}": found / r,
        f"map_hits_at_{top_k}": precision_sum / found.clamp(min=1),
        f"ndcg_at_{top_k}": (hits * gains).sum(dim=1) / ideal,
        f"map_at_{top_k}": precision_sum / r.clamp(max=top_k),
    }
    for c in recall_at:
        if c < top_k:
            out[f"recall_at_{c}"] = hits[:, :c].sum(dim=1) / r
            out[f"hit_at_{c}"] = hits[:, :c].amax(dim=1)
    return {name: float(out[name].mean()) for name in names}  # the @top_k ones first
