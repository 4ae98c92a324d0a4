"""The fast retrieval metrics equal brute-force references on random embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.retrieval import RetrievalMAP, RetrievalMRR, RetrievalRecall

from finetune_budget.metrics import retrieval_metrics


def _random(n: int, groups: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1), torch.randint(
        0, groups, (n,), generator=g
    )


def _numpy_reference(emb: np.ndarray, groups: np.ndarray, k: int) -> dict[str, float]:
    """Plain-Python mRR@k, recall@k, AP@k (AP over relevant items in the top k) per query."""
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    mrr, recall, ap = [], [], []
    for i in range(len(emb)):
        relevant = groups == groups[i]
        relevant[i] = False
        if not relevant.any():
            continue
        ranked = np.argsort(-sims[i], kind="stable")[:k]
        hits = relevant[ranked]
        mrr.append(1.0 / (np.argmax(hits) + 1) if hits.any() else 0.0)
        recall.append(hits.sum() / relevant.sum())
        positions = np.flatnonzero(hits) + 1
        ap.append(np.mean(np.arange(1, len(positions) + 1) / positions) if len(positions) else 0.0)
    return {
        f"mrr_at_{k}": np.mean(mrr),
        f"recall_at_{k}": np.mean(recall),
        f"map_at_{k}": np.mean(ap),
    }


@pytest.mark.parametrize(("n", "groups", "k"), [(300, 12, 20), (120, 40, 5), (50, 3, 20)])
def test_metrics_equal_a_plain_python_reference(n, groups, k):
    emb, g = _random(n, groups)
    ours = retrieval_metrics(emb, query_groups=g, top_k=k, chunk_size=64)
    ref = _numpy_reference(emb.numpy(), g.numpy(), k)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-5), key


def test_metrics_equal_torchmetrics_on_the_full_score_matrix():
    emb, g = _random(200, 15, seed=1)
    sims = emb @ emb.T
    n = len(emb)
    off_diag = ~torch.eye(n, dtype=torch.bool)
    preds = sims[off_diag]
    target = (g[:, None] == g[None, :])[off_diag]
    indexes = torch.arange(n)[:, None].expand(n, n)[off_diag]
    ours = retrieval_metrics(emb, query_groups=g, top_k=20, chunk_size=50)
    for name, metric in {
        "mrr_at_20": RetrievalMRR(top_k=20, empty_target_action="skip"),
        "recall_at_20": RetrievalRecall(top_k=20, empty_target_action="skip"),
        "map_at_20": RetrievalMAP(top_k=20, empty_target_action="skip"),
        "recall_at_5": RetrievalRecall(top_k=5, empty_target_action="skip"),
    }.items():
        assert ours[name] == pytest.approx(float(metric(preds, target, indexes=indexes)), abs=1e-6)


def test_perfect_and_query_gallery_retrieval():
    groups = torch.arange(10).repeat_interleave(3)
    centers = F.normalize(torch.randn(10, 8), dim=-1)
    emb = centers[groups] + 1e-3 * torch.randn(30, 8)
    perfect = retrieval_metrics(F.normalize(emb, dim=-1), query_groups=groups, top_k=20)
    assert perfect["mrr_at_20"] == pytest.approx(1.0) and perfect["recall_at_20"] == pytest.approx(
        1.0
    )
    # captions -> images: each query's own gallery item is the one relevant item
    gallery = F.normalize(torch.randn(10, 8), dim=-1)
    out = retrieval_metrics(
        gallery[groups],
        gallery,
        query_groups=groups,
        gallery_groups=torch.arange(10),
        top_k=5,
        recall_at=(1,),
    )
    assert out["recall_at_1"] == pytest.approx(1.0) and out["mrr_at_5"] == pytest.approx(1.0)
