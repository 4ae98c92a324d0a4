"""Seconds to score a held-out split: the retrieval metrics on CLINC150's shape by default.

    .venv/bin/python bench/bench_metrics.py [--n 3000] [--groups 150] [--dim 384] [--repeats 3]

Random L2-normalised embeddings, every item querying all others (the text task's evaluation).
Prints, as medians over repeats in one process: our `retrieval_metrics` (every metric from the
top-k hits at once) against torchmetrics' retrieval metrics on the same rankings (each query's
top k, then its other relevant items; a Python loop over the queries: what `retrieval_metrics`
ran until 2026-12-04), and the largest difference between the two's values.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torchmetrics.retrieval import (
    RetrievalHitRate,
    RetrievalMAP,
    RetrievalMRR,
    RetrievalNormalizedDCG,
    RetrievalRecall,
)

from finetune_budget.retrieval.metrics import retrieval_metrics


def _median_s(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def torchmetrics_scores(emb: torch.Tensor, groups: torch.Tensor, k: int) -> dict[str, float]:
    """The same metrics by torchmetrics, on each query's top k plus its other relevant items
    (scored below the top k), self excluded."""
    n = len(emb)
    sims = emb @ emb.T
    sims.fill_diagonal_(float("-inf"))
    relevant = groups[:, None] == groups[None, :]
    relevant.fill_diagonal_(False)
    top_scores, top_idx = sims.topk(k, dim=1)
    rest = relevant.clone()
    rest.scatter_(1, top_idx, False)
    q_rest = rest.nonzero(as_tuple=True)[0]
    scores = torch.cat([top_scores.flatten(), top_scores[q_rest, -1] - 1.0])
    scores = scores - scores.min() + 1.0  # torchmetrics counts only scores > 0
    targets = torch.cat([relevant.gather(1, top_idx).flatten(), torch.ones_like(q_rest).bool()])
    ids = torch.cat([torch.arange(n).repeat_interleave(k), q_rest])
    skip = {"empty_target_action": "skip"}
    metrics = {
        f"mrr_at_{k}": RetrievalMRR(top_k=k, **skip),
        f"recall_at_{k}": RetrievalRecall(top_k=k, **skip),
        f"map_hits_at_{k}": RetrievalMAP(top_k=k, **skip),
        f"ndcg_at_{k}": RetrievalNormalizedDCG(top_k=k, **skip),
    }
    for cut in (1, 5, 10):
        metrics[f"recall_at_{cut}"] = RetrievalRecall(top_k=cut, **skip)
        metrics[f"hit_at_{cut}"] = RetrievalHitRate(top_k=cut, **skip)
    return {name: float(m(scores, targets, indexes=ids)) for name, m in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--groups", type=int, default=150)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    k = 20
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(args.n, args.dim, generator=g), dim=-1)
    groups = torch.arange(args.n) % args.groups
    ours_s, ours = _median_s(lambda: retrieval_metrics(emb, query_groups=groups), args.repeats)
    tm_s, tm = _median_s(lambda: torchmetrics_scores(emb, groups, k), args.repeats)
    diff = max(abs(ours[name] - value) for name, value in tm.items())
    print(f"{args.n} items, {args.groups} groups, dim {args.dim}, top {k}; {platform.processor()}")
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median seconds)")
    print(f"retrieval_metrics (ours, all metrics)   {ours_s:8.3f} s")
    print(f"torchmetrics, the same metrics          {tm_s:8.3f} s   ({tm_s / ours_s:.0f}x)")
    print(f"largest |difference| of the {len(tm)} shared metrics: {diff:.1e}")
    print(
        f"repeat: .venv/bin/python bench/bench_metrics.py --n {args.n} --groups {args.groups} "
        f"--dim {args.dim} --repeats {args.repeats}"
    )


if __name__ == "__main__":
    main()
