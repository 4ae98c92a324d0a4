"""Retrieval metrics: small cases worked out by hand from the definitions, the fast candidate-
list implementation against brute-force references on random embeddings, and the chunked,
bounded-memory scoring against the (Q, G) relevance matrix it replaced (`reference_metrics`)."""

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

from finetune_budget.retrieval.metrics import chunk_rows, relevant_counts, retrieval_metrics


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


def reference_metrics(
    queries: torch.Tensor,
    gallery: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    gallery_groups: torch.Tensor | None = None,
    top_k: int = 20,
    recall_at: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """`retrieval_metrics` as it was before the chunked relevance (until issue 32): a full (Q, G)
    relevance matrix, everything on the CPU. Kept verbatim as the oracle of the new one."""
    exclude_self = gallery is None
    if gallery is None:
        gallery, gallery_groups = queries, query_groups
    assert query_groups is not None and gallery_groups is not None
    relevant = query_groups[:, None].cpu() == gallery_groups[None, :].cpu()
    queries, gallery = queries.cpu(), gallery.cpu()
    k = min(top_k, gallery.shape[0] - int(exclude_self))
    hits_out, n_rel_out = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start : start + chunk_size].float()
        sims = q @ gallery.float().T
        rel = relevant[start : start + chunk_size].clone()
        if exclude_self:
            rows = torch.arange(q.shape[0])
            sims[rows, rows + start] = float("-inf")
            rel[rows, rows + start] = False
        top_idx = sims.topk(k, dim=1).indices
        hits_out.append(rel.gather(1, top_idx))
        n_rel_out.append(rel.sum(dim=1))
    all_hits, all_r = torch.cat(hits_out), torch.cat(n_rel_out)
    names = [f"{m}_at_{top_k}" for m in ("mrr", "recall", "map", "map_hits", "ndcg")]
    names += [f"{m}_at_{c}" for c in recall_at if c < top_k for m in ("recall", "hit")]
    answered = all_r > 0
    if not bool(answered.any()):
        return dict.fromkeys(names, 0.0)
    hits, n_rel = all_hits[answered].float(), all_r[answered]
    r = n_rel.float()
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)
    found = hits.sum(dim=1)
    first = hits.argmax(dim=1).float() + 1
    precision_sum = (hits.cumsum(dim=1) / ranks * hits).sum(dim=1)
    gains = 1.0 / torch.log2(ranks + 1)
    ideal = gains.cumsum(dim=0)[n_rel.clamp(max=hits.shape[1]) - 1]
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
    return {name: float(out[name].mean()) for name in names}


def _tied(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) signed one-hot rows: every similarity is exactly -1, 0 or 1, so most of them tie
    (whatever the order of the sums), straddling the top-k cut-off."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.randint(0, dim, (n,), generator=g)
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return F.one_hot(axis, dim).float() * sign[:, None]


def _groups(n: int, seed: int) -> torch.Tensor:
    """(n,) ids with many singleton groups (no other relevant item) and a few large ones; large,
    negative and sparse ids."""
    g = torch.Generator().manual_seed(seed)
    big = torch.randint(0, 4, (n,), generator=g) * 1000 - 1500
    single = torch.arange(n) * 7 + 10_000
    alone = torch.rand(n, generator=g) < 0.3
    alone[0] = True
    return torch.where(alone, single, big)


def _assert_same(ours: dict[str, float], ref: dict[str, float]) -> None:
    assert list(ours) == list(ref)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "chunk"), [(97, 20, None), (97, 5, 7), (40, 50, 1), (3, 20, 2)]
)
def test_chunked_self_retrieval_equals_the_full_relevance_matrix(n, k, chunk, tied):
    emb = _tied(n, 4, seed=n) if tied else _random(n, 1, seed=n)[0]
    groups = _groups(n, seed=k)
    ours = retrieval_metrics(emb, query_groups=groups, top_k=k, recall_at=(1, 3), chunk_size=chunk)
    _assert_same(ours, reference_metrics(emb, query_groups=groups, top_k=k, recall_at=(1, 3)))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    ("q", "g", "k", "chunk"), [(60, 45, 20, None), (60, 45, 3, 8), (5, 4, 20, 2)]
)
def test_chunked_query_gallery_retrieval_equals_the_full_relevance_matrix(q, g, k, chunk, tied):
    # the queries include copies of gallery items (a self-match that counts as a hit), queries
    # whose group has no gallery item and gallery groups no query asks for
    gen = torch.Generator().manual_seed(q + g + k)
    gallery = _tied(g, 3, seed=g) if tied else _random(g, 1, seed=g)[0]
    gallery_groups = torch.randint(0, 6, (g,), generator=gen)
    copies = torch.randint(0, g, (q // 2,), generator=gen)
    queries = torch.cat(
        [
            gallery[copies],
            _tied(q - q // 2, 3, seed=q) if tied else _random(q - q // 2, 1, seed=q)[0],
        ]
    )
    query_groups = torch.cat(
        [gallery_groups[copies], torch.randint(3, 9, (q - q // 2,), generator=gen)]
    )
    assert not torch.isin(query_groups, gallery_groups).all()
    args = (queries, gallery, query_groups, gallery_groups, k, (1, 3))
    _assert_same(retrieval_metrics(*args, chunk_size=chunk), reference_metrics(*args))


def test_no_query_with_a_relevant_item_gives_zeros_like_the_reference():
    emb, _ = _random(10, 1)
    groups = torch.arange(10)  # every group a singleton: nothing to find
    ours = retrieval_metrics(emb, query_groups=groups, top_k=5, recall_at=(1,))
    _assert_same(ours, reference_metrics(emb, query_groups=groups, top_k=5, recall_at=(1,)))
    assert set(ours.values()) == {0.0}


def test_relevant_counts_from_group_sizes():
    query_groups = torch.tensor([5, -2, 7, 5, 100])
    gallery_groups = torch.tensor([5, 5, 5, -2, 9, 9])
    expected = [int((gallery_groups == q).sum()) for q in query_groups]  # [3, 1, 0, 3, 0]
    assert relevant_counts(query_groups, gallery_groups, exclude_self=False).tolist() == expected
    own = relevant_counts(gallery_groups, gallery_groups, exclude_self=True)
    assert own.tolist() == [2, 2, 2, 0, 1, 1]
    assert (
        relevant_counts(query_groups, gallery_groups[:0], exclude_self=False).tolist() == [0] * 5
    )


def test_chunk_rows_keeps_a_chunk_of_scores_within_the_bound():
    cpu = torch.device("cpu")
    for n_gallery in (1, 1000, 100_000, 10_000_000):
        rows = chunk_rows(n_gallery, cpu, scores_mb=256)
        assert rows >= 1
        assert rows == 1 or rows * n_gallery * 4 <= 256 * 2**20
        assert (rows + 1) * n_gallery * 4 > 256 * 2**20  # the largest chunk within the bound
    assert chunk_rows(100_000, cpu) == 256 * 2**20 // (4 * 100_000)  # SCORES_MB by default


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scoring_on_the_gpu_equals_the_cpu_reference():
    emb, groups = _random(2000, 40, dim=32, seed=3)
    ref = reference_metrics(emb, query_groups=groups, top_k=20)
    _assert_same(retrieval_metrics(emb.cuda(), query_groups=groups.cuda(), top_k=20), ref)
    _assert_same(retrieval_metrics(emb.cuda(), query_groups=groups, top_k=20), ref)
