"""Retrieval metrics: small cases worked out by hand from the definitions, and the fast candidate-
list implementation against brute-force references on random embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.retrieval import (
    RetrievalHitRate,
    RetrievalMAP,
    RetrievalMRR,
    RetrievalNormalizedDCG,
    RetrievalRecall,
)

from finetune_budget.metrics import retrieval_metrics


def _ranked(query_groups: list[int], gallery_groups: list[int], top_k: int, recall_at=(1,)):
    """Metrics where every query ranks the gallery in list order (rank 1 = gallery_groups[0]).

    Gallery item r sits at angle r * pi / (2 G) on the unit circle and every query at angle 0, so
    similarity falls strictly with r. Same group = relevant.
    """
    g = len(gallery_groups)
    angles = torch.arange(g, dtype=torch.float32) * math.pi / (2 * g)
    gallery = torch.stack([angles.cos(), angles.sin()], dim=1)
    queries = torch.tensor([[1.0, 0.0]]).repeat(len(query_groups), 1)
    return retrieval_metrics(
        queries,
        gallery,
        torch.tensor(query_groups),
        torch.tensor(gallery_groups),
        top_k=top_k,
        recall_at=recall_at,
    )


def _ranking(relevant_ranks: set[int], length: int) -> list[int]:
    """Gallery groups for one query of group 1: relevant (1) at the given 1-based ranks."""
    return [1 if r in relevant_ranks else 0 for r in range(1, length + 1)]


def _dcg(ranks) -> float:
    return sum(1.0 / math.log2(r + 1) for r in ranks)


def test_one_query_with_hits_at_ranks_2_and_4_and_a_relevant_item_beyond_the_cut_off():
    # k = 5, R = 3 relevant items at ranks 2, 4 and 7
    out = _ranked([1], _ranking({2, 4, 7}, 10), top_k=5, recall_at=(1, 3))
    assert out["mrr_at_5"] == pytest.approx(1 / 2)
    assert out["recall_at_5"] == pytest.approx(2 / 3)
    assert out["recall_at_3"] == pytest.approx(1 / 3)
    assert out["recall_at_1"] == 0.0
    assert out["hit_at_3"] == 1.0 and out["hit_at_1"] == 0.0
    # precision at the hits: 1/2 at rank 2, 2/4 at rank 4
    assert out["map_hits_at_5"] == pytest.approx((1 / 2 + 2 / 4) / 2)  # / hits retrieved
    assert out["map_at_5"] == pytest.approx((1 / 2 + 2 / 4) / 3)  # / min(k, R) = 3
    # DCG of hits at ranks 2 and 4 over the ideal DCG of 3 hits at ranks 1, 2, 3
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert out["ndcg_at_5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)


def test_a_second_hit_at_rank_20_raises_map_at_20_while_map_hits_at_20_falls():
    # The issue's example, with CLINC150's 19 relevant items per query.
    one = _ranked([1], _ranking({1, *range(21, 39)}, 40), top_k=20, recall_at=(1, 10))
    two = _ranked([1], _ranking({1, 20, *range(21, 38)}, 40), top_k=20, recall_at=(1, 10))
    assert one["map_at_20"] == pytest.approx(1 / 19)
    assert two["map_at_20"] == pytest.approx((1 + 2 / 20) / 19)
    assert two["map_at_20"] > one["map_at_20"]
    assert one["map_hits_at_20"] == pytest.approx(1.0)
    assert two["map_hits_at_20"] == pytest.approx(0.55)
    assert one["recall_at_20"] == pytest.approx(1 / 19)
    assert two["recall_at_20"] == pytest.approx(2 / 19)
    ideal = _dcg(range(1, 20))
    assert one["ndcg_at_20"] == pytest.approx(1 / ideal)
    assert two["ndcg_at_20"] == pytest.approx(_dcg([1, 20]) / ideal)
    for out in (one, two):
        assert out["mrr_at_20"] == 1.0 and out["hit_at_1"] == 1.0 and out["hit_at_10"] == 1.0


def test_means_over_queries_skip_queries_without_a_relevant_item():
    # gallery in rank order: groups 1, 2, 2, 1, 3, 3; k = 3; the query of group 4 has none
    out = _ranked([1, 2, 4], [1, 2, 2, 1, 3, 3], top_k=3)
    # query 1: hits at ranks 1 (and 4, beyond k); query 2: hits at ranks 2 and 3
    assert out["mrr_at_3"] == pytest.approx((1 + 1 / 2) / 2)
    assert out["recall_at_3"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["recall_at_1"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["hit_at_1"] == pytest.approx((1 + 0) / 2)
    ap_hits_2 = (1 / 2 + 2 / 3) / 2
    assert out["map_hits_at_3"] == pytest.approx((1 + ap_hits_2) / 2)
    assert out["map_at_3"] == pytest.approx((1 / 2 + ap_hits_2) / 2)  # both have R = 2
    ndcg_1 = 1 / _dcg([1, 2])
    ndcg_2 = _dcg([2, 3]) / _dcg([1, 2])
    assert out["ndcg_at_3"] == pytest.approx((ndcg_1 + ndcg_2) / 2)


def test_self_retrieval_excludes_the_query_itself():
    # three items on the unit circle at angles 0, 0.1, 0.3; items 0 and 2 share a group
    angles = torch.tensor([0.0, 0.1, 0.3])
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    out = retrieval_metrics(emb, query_groups=torch.tensor([0, 1, 0]), top_k=20)
    # item 0 ranks item 1, then item 2 (relevant); item 2 ranks item 1, then item 0 (relevant);
    # item 1 has no relevant item and is skipped
    assert out["mrr_at_20"] == pytest.approx(1 / 2)
    assert out["hit_at_1"] == 0.0 and out["recall_at_20"] == 1.0
    assert out["map_at_20"] == pytest.approx(1 / 2) and out["map_hits_at_20"] == pytest.approx(
        1 / 2
    )
    assert out["ndcg_at_20"] == pytest.approx(1 / math.log2(3))


def _random(n: int, groups: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1), torch.randint(
        0, groups, (n,), generator=g
    )


def _numpy_reference(emb: np.ndarray, groups: np.ndarray, k: int) -> dict[str, float]:
    """Every metric of the module docstring, per query over the full ranking, in plain Python."""
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    rows: dict[str, list[float]] = {}
    for i in range(len(emb)):
        relevant = groups == groups[i]
        relevant[i] = False
        n_rel = int(relevant.sum())
        if not n_rel:
            continue
        hits = relevant[np.argsort(-sims[i], kind="stable")[:k]]
        positions = np.flatnonzero(hits) + 1
        precisions = np.arange(1, len(positions) + 1) / positions
        values = {
            f"mrr_at_{k}": 1.0 / positions[0] if len(positions) else 0.0,
            f"recall_at_{k}": len(positions) / n_rel,
            f"map_at_{k}": precisions.sum() / min(k, n_rel),
            f"map_hits_at_{k}": precisions.mean() if len(positions) else 0.0,
            f"ndcg_at_{k}": _dcg(positions) / _dcg(range(1, min(k, n_rel) + 1)),
        }
        for cut in (1, 3):
            values[f"hit_at_{cut}"] = float(hits[:cut].any())
            values[f"recall_at_{cut}"] = hits[:cut].sum() / n_rel
        for key, value in values.items():
            rows.setdefault(key, []).append(value)
    return {key: float(np.mean(v)) for key, v in rows.items()}


@pytest.mark.parametrize(("n", "groups", "k"), [(300, 12, 20), (120, 40, 5), (50, 3, 20)])
def test_metrics_equal_a_plain_python_reference(n, groups, k):
    emb, g = _random(n, groups)
    ours = retrieval_metrics(emb, query_groups=g, top_k=k, recall_at=(1, 3), chunk_size=64)
    ref = _numpy_reference(emb.numpy(), g.numpy(), k)
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-5), key


def test_metrics_equal_torchmetrics_on_the_full_score_matrix():
    emb, g = _random(150, 12, seed=1)
    sims = emb @ emb.T
    n = len(emb)
    off_diag = ~torch.eye(n, dtype=torch.bool)
    preds = sims[off_diag] + 2.0  # torchmetrics ignores scores <= 0
    target = (g[:, None] == g[None, :])[off_diag]
    indexes = torch.arange(n)[:, None].expand(n, n)[off_diag]
    ours = retrieval_metrics(emb, query_groups=g, top_k=20, chunk_size=50)
    skip = {"empty_target_action": "skip"}
    for name, metric in {
        "mrr_at_20": RetrievalMRR(top_k=20, **skip),
        "recall_at_20": RetrievalRecall(top_k=20, **skip),
        "map_hits_at_20": RetrievalMAP(top_k=20, **skip),
        "ndcg_at_20": RetrievalNormalizedDCG(top_k=20, **skip),
        "recall_at_5": RetrievalRecall(top_k=5, **skip),
        "hit_at_5": RetrievalHitRate(top_k=5, **skip),
    }.items():
        expected = float(metric(preds, target, indexes=indexes))
        assert ours[name] == pytest.approx(expected, abs=1e-6), name


def test_perfect_and_query_gallery_retrieval():
    groups = torch.arange(10).repeat_interleave(3)
    centers = F.normalize(torch.randn(10, 8), dim=-1)
    emb = centers[groups] + 1e-3 * torch.randn(30, 8)
    perfect = retrieval_metrics(F.normalize(emb, dim=-1), query_groups=groups, top_k=20)
    for key in ("mrr_at_20", "recall_at_20", "map_at_20", "map_hits_at_20", "ndcg_at_20"):
        assert perfect[key] == pytest.approx(1.0), key
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
    assert out["hit_at_1"] == pytest.approx(1.0)
